"""Hugging Face checkpoints in and out: folders, hub ids, safetensors (single or sharded) and .bin."""

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open

from neoxko.builtin import BUILTIN, DEFAULT_MODEL, MODEL_HELP  # noqa: F401 (re-exported)
from neoxko.config import ModelConfig
from neoxko.errors import CheckpointError
from neoxko.model import GPTNeoX

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Buffers that old GPT-NeoX checkpoints carry and that we recompute.
SKIPPED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
HUB_FILES = ["config.json", "*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", BIN_INDEX,
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(path_or_id: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is, a built-in model by name, else a hub id fetched into (or read from) the hub cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_id) in BUILTIN:
        return BUILTIN[str(path_or_id)]
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=allow_patterns or HUB_FILES))
    except HFValidationError:
        raise CheckpointError(
            f"{path_or_id!r} is neither an existing folder nor a valid hub id (like 'EleutherAI/polyglot-ko-1.3b')"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no hub repository {path_or_id!r}; check the id, or pass a local folder") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{path_or_id!r} is not a local folder and is not in the hub cache, and the hub cannot be "
            "reached (offline?); download it once with network access or pass a local folder"
        ) from None


def adapter_base(folder: Path) -> Path | None:
    """The base model folder of a LoRA adapter folder (adapter_config.json, no config.json), else None."""
    config = folder / "adapter_config.json"
    if (folder / "config.json").is_file() or not config.is_file():
        return None
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON: {e}") from None
    if not base:
        raise CheckpointError(f"{folder} is a LoRA adapter that names no base model (base_model_name_or_path); "
                              f"pass the base as the model and this folder as the adapter (--model BASE --adapter "
                              f"{folder})")
    return resolve(base)


def read_config(folder: Path) -> ModelConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    return ModelConfig.from_file(folder / "config.json")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(path_or_id: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", quantize: str | None = None, group_size: int = 64,
               adapter: str | Path | None = None) -> GPTNeoX:
    """Load a GPT-NeoX checkpoint in Hugging Face layout from a folder or a hub id.

    dtype None keeps the dtype the weights are stored in. Tensors go one at a time from the file
    into the model, which is built without memory of its own, so the weights are held only once.
    quantize "int8" swaps the linear layers for int8 weight-only ones after loading, "int4" for int4 ones with
    groups of group_size input features (CPU only); checkpoints written quantized (`neoxko quantize`) load as such.
    adapter: a LoRA adapter folder or hub id (ours or peft's), merged into the weights before any quantization; a
    path_or_id that is itself an adapter folder loads the base it names with it.
    """
    from neoxko.quantize import GROUP_SIZES, INT4_METHOD, QUANT_METHOD, quantize_model

    if quantize not in (None, "int8", "int4"):
        raise CheckpointError(f"unknown quantization {quantize!r}; the ones supported are int8 and int4")
    folder = resolve(path_or_id)
    if (base := adapter_base(folder)) is not None:
        if adapter is not None:
            raise CheckpointError(f"{folder} is itself an adapter; pass its base model with --adapter {adapter}")
        folder, adapter = base, folder
    config = read_config(folder)
    method = _quant_method(folder)
    if adapter is not None and method:
        raise CheckpointError(f"{folder} is quantized; an adapter merges into the float weights, so load the float "
                              "checkpoint with the adapter (and --quantize to quantize after merging)")
    if method not in (None, QUANT_METHOD, INT4_METHOD):
        raise CheckpointError(f"{folder} is quantized with {method!r}, which neoxko cannot read; "
                              f"load the unquantized checkpoint (and pass --quantize int8)")
    if method == INT4_METHOD:
        stored = _quant_config(folder).get("group_size")
        if stored not in GROUP_SIZES:
            raise CheckpointError(f"{folder}/config.json's quantization_config has group_size {stored!r}; an int4 "
                                  f"checkpoint needs one of {', '.join(map(str, GROUP_SIZES))}")
        if torch.device(device).type != "cpu":
            raise CheckpointError(f"{folder} is int4, which runs on the CPU only; load it with device 'cpu', or "
                                  "load the float checkpoint (with --quantize int8) on this device")
        if quantize == "int8":
            raise CheckpointError(f"{folder} is already int4; int8 quantizes from the float checkpoint")
    dtype = parse_dtype(dtype)
    tied_head = _quant_config(folder).get("tied_head", "int8")  # files from before 0.2 have an int8 tied head
    kernel = None if torch.device(device).type == "cpu" else False  # neoxko's kernels are for the CPU
    with torch.device("meta"):
        model = GPTNeoX(config)
        if method == INT4_METHOD:
            quantize_model(model, empty=True, bits=4, group_size=stored, kernel=kernel)
        elif method:
            quantize_model(model, empty=True, tied_head=tied_head, kernel=kernel)
    tied = config.tie_word_embeddings and (not method or tied_head == "float" or method == INT4_METHOD)
    shapes = model.state_dict()  # (meta tensors: each one's shape and dtype, checked as the file is read)
    loaded = {name: _aligned(tensor.to(device=device, dtype=dtype if dtype and tensor.is_floating_point() else
                                       tensor.dtype))
              for name, tensor in checkpoint_tensors(folder, shapes, tied)}
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    model.setup_rope(device)
    if adapter is not None:
        from neoxko.finetune.lora import load_adapter

        adapter = resolve(adapter)
        load_adapter(model, adapter)
    if quantize == "int8":
        quantize_model(model)
    elif quantize == "int4" and method != INT4_METHOD:  # (an int4 checkpoint keeps the group size it was written with)
        if method:
            raise CheckpointError(f"{folder} is already int8; int4 quantizes from the float checkpoint")
        quantize_model(model, bits=4, group_size=group_size)
    # save_model copies the tokenizer from here: an adapter's own (with its chat template) if it has one
    model.source_folder = adapter if adapter is not None and (adapter / "tokenizer.json").is_file() else folder
    return model.eval()


def checkpoint_tensors(folder: Path, shapes: dict, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the folder's tensors one at a time under our parameter names, each checked against shapes
    (name -> expected shape, or a meta tensor: its shape and, for integer tensors, its dtype); refuse unknown or
    misshapen tensors, and missing ones at the end."""
    expected = dict(shapes)
    if tied:
        expected.pop("embed_out.weight", None)
    seen = set()
    for name, tensor in _read_tensors(folder):
        name = "embed_out.weight" if name == "lm_head.weight" else name
        if name.endswith(SKIPPED_SUFFIXES) or (tied and name == "embed_out.weight"):
            continue
        if name not in expected:
            raise CheckpointError(
                f"unexpected tensor {name!r} in {folder}: it is not part of a GPT-NeoX model with this "
                "config.json; is config.json from the same checkpoint?"
            )
        want = expected[name]
        shape, dtype = (want.shape, want.dtype) if isinstance(want, torch.Tensor) else (want, None)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but the config.json "
                f"in {folder} expects {tuple(shape)}"
            )
        if dtype is not None and not dtype.is_floating_point and tensor.dtype != dtype:
            raise CheckpointError(f"tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} in {folder}, but "
                                  f"its quantization_config's layout stores it as {str(dtype).removeprefix('torch.')}")
        seen.add(name)
        yield name, tensor
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint in {folder} is missing {len(missing)} tensor(s): {shown}")


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


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor read in place from a safetensors file starts wherever the header left it; torch's CPU int8
    kernel (and vector loads generally) want 64-byte aligned data, so such a tensor is copied once."""
    return tensor.clone() if tensor.device.type == "cpu" and tensor.data_ptr() % 64 else tensor


def _quant_config(folder: Path) -> dict:
    """config.json's quantization_config ({} for none), refused by name where neoxko cannot read it."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quant = raw.get("quantization_config") or {}
    if not isinstance(quant, dict) or not isinstance(quant.get("quant_method"), str | None):
        raise CheckpointError(f"{folder}/config.json's quantization_config is {quant!r}, not an object with a "
                              "quant_method; neoxko reads neoxko_int8 and neoxko_int4 (written by neoxko quantize)")
    bits = {"neoxko_int8": 8, "neoxko_int4": 4}.get(quant.get("quant_method"))
    if bits is not None and quant.get("bits", bits) != bits:
        raise CheckpointError(f"{folder}/config.json's quantization_config says {quant['quant_method']} with bits "
                              f"{quant.get('bits')!r}; that layout holds {bits}-bit weights only")
    return quant


def _quant_method(folder: Path) -> str | None:
    return _quant_config(folder).get("quant_method")


def _read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from the first weight layout found, safetensors before .bin."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        if (folder / index_name).is_file():
            files = _index_files(folder / index_name)
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        read = _read_safetensors if single == SAFETENSORS else _read_bin
        for file in files:
            yield from read(file)
        return
    raise CheckpointError(
        f"{folder} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}"
    )


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index (need a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid shard index: 'weight_map' must map tensor names to file names")
    outside = [f for f in dict.fromkeys(weight_map.values()) if not _inside(index.parent, f)]
    if outside:
        raise CheckpointError(f"{index} names weight file(s) outside its folder: {', '.join(outside[:3])}; "
                              "a shard index may only name files next to it")
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{index} names shard(s) that are not there: {', '.join(absent)}")
    return files


def _inside(folder: Path, name: str) -> bool:
    """Whether name is a plain relative path that stays inside folder (no '..', no absolute path)."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return False
    return (folder / path).resolve().is_relative_to(folder.resolve())


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            # Reopened per tensor: the file's mapping (and the pages read through it) goes away
            # before the next tensor, so converting dtypes never holds the file and the model at once.
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(name)
            yield name, tensor
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); re-download or re-save it") from None


def _read_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        # weights_only: never run pickled code; mmap: tensors stay in the page cache, not copied.
        # Files from torch < 1.6 (not zip) cannot be memory-mapped and are read whole.
        zip_format = zipfile.is_zipfile(file)
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zip_format)
    except Exception as e:  # torch raises several types for a bad or unsafe pickle
        raise CheckpointError(f"{file} could not be read as a weights-only PyTorch checkpoint: {e}") from None
    yield from state.items()


def save_model(model: GPTNeoX, path: str | Path, tokenizer=None, max_shard_size: int | str = "5GB") -> Path:
    """Write config.json and safetensors (sharded past max_shard_size) in Hugging Face layout, with the
    tokenizer beside them so the folder is a complete model.

    tokenizer: a Tokenizer, or a folder / built-in name / hub id whose tokenizer files are copied; by
    default the tokenizer of the folder the model was loaded from, if it had one.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer_beside(model, folder, tokenizer)
    from neoxko.quantize import QUANTIZATION_CONFIG, int4_config

    state = {k: v.detach() for k, v in model.state_dict().items()}  # (int4 layers give their portable layout)
    quantized = getattr(model, "quantized", False)
    tied_head = getattr(model, "tied_head", None)
    if model.config.tie_word_embeddings and (not quantized or tied_head == "float"):
        state.pop("embed_out.weight", None)  # tied back to embed_in on load (transformers does the same)
    dtype = model.gpt_neox.embed_in.weight.dtype
    if getattr(model, "quant_bits", 8) == 4:
        quant = int4_config(model.group_size)
    else:
        quant = QUANTIZATION_CONFIG | ({"tied_head": tied_head} if tied_head else {})
    model.config.save(folder / "config.json", dtype=str(dtype).removeprefix("torch."),
                      extra={"quantization_config": quant} if quantized else None)
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    # huggingface_hub writes through private temporary files (mode 0600): give them config.json's mode
    mode = (folder / "config.json").stat().st_mode & 0o777
    for written in (*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")):
        written.chmod(mode)
    return folder

