"""Loading and saving models: a name resolved to files, read in its format, an adapter and a quantization applied
(neoxko.formats holds each format in a module of its own), and Hugging Face folders written."""

from pathlib import Path

import torch

from neoxko.builtin import BUILTIN, DEFAULT_MODEL, MODEL_HELP  # noqa: F401 (re-exported)
from neoxko.errors import CheckpointError
from neoxko.formats.hf import (  # noqa: F401 (re-exported: the loader's pieces, as before the formats' split)
    DTYPES,
    SKIPPED_SUFFIXES,
    aligned,
    checkpoint_tensors,
    parse_dtype,
    quant_config,
    read_config,
    write_tensors,
)
from neoxko.formats.locate import HUB_FILES, adapter_base, resolve  # noqa: F401 (re-exported)
from neoxko.model import GPTNeoX


def load_model(path_or_id: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", quantize: str | None = None, group_size: int = 64,
               adapter: str | Path | None = None) -> GPTNeoX:
    """Load a GPT-NeoX checkpoint in Hugging Face layout from a folder or a hub id.

    dtype None: the dtype this CPU computes the stored one in fastest (neoxko.hardware.default_dtype: as stored, except
    bf16/f16 weights on a CPU that neither multiplies bf16 natively nor runs neoxko's kernels, which compute in
    float32), the same choice the command line and the server make. Tensors go one at a time from the file
    into the model, which is built without memory of its own, so the weights are held only once.
    quantize "int8" swaps the linear layers for int8 weight-only ones after loading, "int4" for int4 ones with
    groups of group_size input features (CPU only); checkpoints written quantized (`neoxko quantize`) load as such.
    adapter: a LoRA adapter folder or hub id (ours or peft's), merged into the weights before any quantization; a
    path_or_id that is itself an adapter folder loads the base it names with it.

    The steps go through neoxko.formats: locate the files, read them in the format config.json names (float, int8,
    int4), apply the adapter (peft), then the quantization.
    """
    from neoxko.formats import peft, quantized, stored

    target = quantized(quantize) if quantize is not None else None
    folder = resolve(path_or_id)
    if (base := peft.detect(folder)) is not None:
        if adapter is not None:
            raise CheckpointError(f"{folder} is itself an adapter; pass its base model with --adapter {adapter}")
        folder, adapter = base, folder
    config = read_config(folder)
    quant = quant_config(folder)
    fmt = stored(folder, quant)
    if adapter is not None and quant:
        raise CheckpointError(f"{folder} is quantized; an adapter merges into the float weights, so load the float "
                              "checkpoint with the adapter (and --quantize to quantize after merging)")
    if quant:
        fmt.check(folder, quant, device, quantize)
    dtype = parse_dtype(dtype)
    kernel = None if torch.device(device).type == "cpu" else False  # neoxko's kernels are for the CPU
    with torch.device("meta"):
        model = GPTNeoX(config)
        if quant:
            fmt.build(model, quant, kernel)
    tied = fmt.tied(config, quant) if quant else config.tie_word_embeddings
    shapes = model.state_dict()  # (meta tensors: each one's shape and dtype, checked as the file is read)
    chosen = _default_dtypes(device) if dtype is None else None
    loaded = {name: aligned(tensor.to(device=device, dtype=(dtype or chosen(tensor.dtype)) if
                                      tensor.is_floating_point() else tensor.dtype))
              for name, tensor in checkpoint_tensors(folder, shapes, tied)}
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    model.setup_rope(device)
    if adapter is not None:
        adapter = resolve(adapter)
        peft.apply(model, adapter)
    if target is not None and target is not fmt:  # (a quantized folder keeps the settings it was written with)
        target.quantize(model, group_size)
    # save_model copies the tokenizer from here: an adapter's own (with its chat template) if it has one
    model.source_folder = adapter if adapter is not None and (adapter / "tokenizer.json").is_file() else folder
    return model.eval()


def _default_dtypes(device):
    """stored dtype -> the dtype it computes in on this device when none is named (hardware.default_dtype), saying
    once per process when that is not the stored one."""
    from neoxko.hardware import default_dtype

    def chosen(stored: torch.dtype) -> torch.dtype:
        return default_dtype(stored) if torch.device(device).type == "cpu" else stored

    return chosen


def _save_tokenizer_beside(model: GPTNeoX, folder: Path, tokenizer) -> None:
    from neoxko.tokenizer import Tokenizer, copy_tokenizer_files, save_tokenizer

    if isinstance(tokenizer, Tokenizer):
        if tokenizer.source is not None:
            copy_tokenizer_files(tokenizer.source, folder)
        else:
            save_tokenizer(tokenizer, folder, model_max_length=model.config.max_position_embeddings)
    elif tokenizer is not None:
        copy_tokenizer_files(tokenizer, folder)
    elif (source := getattr(model, "source_folder", None)) is not None and (source / "tokenizer.json").is_file():
        copy_tokenizer_files(source, folder)


def save_model(model: GPTNeoX, path: str | Path, tokenizer=None, max_shard_size: int | str = "5GB") -> Path:
    """Write config.json and safetensors (sharded past max_shard_size) in Hugging Face layout, with the
    tokenizer beside them so the folder is a complete model.

    tokenizer: a Tokenizer, or a folder / built-in name / hub id whose tokenizer files are copied; by
    default the tokenizer of the folder the model was loaded from, if it had one.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer_beside(model, folder, tokenizer)
    from neoxko.formats import quantized

    state = {k: v.detach() for k, v in model.state_dict().items()}  # (int4 layers give their portable layout)
    is_quantized = getattr(model, "quantized", False)
    tied_head = getattr(model, "tied_head", None)
    if model.config.tie_word_embeddings and (not is_quantized or tied_head == "float"):
        state.pop("embed_out.weight", None)  # tied back to embed_in on load (transformers does the same)
    dtype = model.gpt_neox.embed_in.weight.dtype
    quant = quantized(f"int{getattr(model, 'quant_bits', 8)}").config(model) if is_quantized else None
    model.config.save(folder / "config.json", dtype=str(dtype).removeprefix("torch."),
                      extra={"quantization_config": quant} if quant else None)
    write_tensors(state, folder, max_shard_size)
    return folder

