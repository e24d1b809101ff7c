"""GGUF, llama.cpp's file (and Ollama's, LM Studio's, llama-cpp-python's): a GPT-NeoX model with its tokenizer, written
through the `gguf` package, llama.cpp's own writer.

What llama.cpp's GPT-NeoX loader reads, and how neoxko's model maps onto it:
- hyperparameters: context, width, depth, feed-forward width, heads, the rotary dims per head (rotary_pct of the head:
  64 of 128 for Polyglot-Ko 1.3B, 64 of 256 for 5.8B), the rotary base, parallel residual, the LayerNorm epsilon;
- tensors: the fused QKV is stored per head (q, k, v of head 0, then head 1...) in Hugging Face's layout and as all
  queries, all keys, all values in llama.cpp's, so its rows are regrouped; a head tied to the embedding is written out
  as output.weight (llama.cpp's loader wants it); norms and biases stay float32;
- the tokenizer: byte-level BPE ("gpt2" model, GPT-2's pre-tokenizer, which is Polyglot-Ko's), every token of the
  padded vocabulary (the padding as unused tokens), the privacy tokens as user-defined tokens (matched in any text, as
  the Hugging Face tokenizer does), the other special tokens as control tokens, bos/eos/pad, the chat template.

read_gguf turns a GPT-NeoX GGUF file (ours, or llama.cpp's converter's or quantizer's, in any quantization the gguf
package dequantizes) back into a Hugging Face folder with its tokenizer: bf16 or f16 where the file's matrices all are,
else float32; a head equal to the embedding is tied again.

Quantizations: bf16, f16, q8_0 and q4_0 are written here (q4_0 keeps the embedding and the head in q8_0, as llama.cpp
raises its head for small quantizations); q4_k_m is made from an f16 file by llama.cpp's own quantizer (needs
llama-cpp-python). A matrix whose rows the quantization's blocks cannot divide is refused by name.
"""

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from neoxko.chat_template import tokenizer_template
from neoxko.errors import CheckpointError
from neoxko.formats.locate import is_gguf
from neoxko.tokenizer import PII_TOKENS

QUANTS = ("bf16", "f16", "q8_0", "q4_0", "q4_k_m")  # written; read: any quantization the gguf package dequantizes
ARCH = "gptneox"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("writing GGUF needs the gguf package (llama.cpp's writer): pip install gguf") from None
    return gguf


def write_gguf(model, path: str | Path, quant: str = "bf16", name: str | None = None) -> Path:
    """Write a loaded neoxko model (float, or int8/int4: dequantized first) and the tokenizer beside its checkpoint
    as one GGUF file for llama.cpp."""
    if quant not in QUANTS:
        raise CheckpointError(f"unknown GGUF quantization {quant!r}; the ones neoxko writes are {', '.join(QUANTS)}")
    path = Path(path)
    if quant == "q4_k_m":
        return _llama_quantize(model, path, name)
    gguf = _gguf()
    config = model.config
    tensors = dict(_float_tensors(model))
    plan = {key: _tensor_type(gguf, key, tensor, quant) for key, tensor in tensors.items()}
    for key, qtype in plan.items():  # (refused before anything is written)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if tensors[key].shape[-1] % block:
            other = "bf16, f16" + (" or q8_0" if block > 32 else "")
            raise CheckpointError(f"{key} has rows of {tensors[key].shape[-1]} values, which {quant}'s blocks of "
                                  f"{block} do not divide; write this model as {other}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name or Path(str(getattr(model, "source_folder", "") or "neoxko")).name)
    writer.add_file_type({"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_rope_dimension_count(config.rotary_ndims)
    writer.add_rope_freq_base(float(config.rotary_emb_base))
    writer.add_parallel_residual(config.use_parallel_residual)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    _add_tokenizer(gguf, writer, model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, config.num_hidden_layers)
    for key, tensor in tensors.items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise CheckpointError(f"{key} has no place in llama.cpp's GPT-NeoX; this model cannot be written as GGUF")
        data = tensor.float().numpy()
        qtype = plan[key]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, data.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def _tensor_type(gguf, key: str, tensor: torch.Tensor, quant: str):
    """The GGML type a tensor is written in: vectors float32; matrices the quantization's (the embedding and the head
    q8_0 in a q4_0 file)."""
    types = gguf.GGMLQuantizationType
    if tensor.dim() == 1:
        return types.F32
    if quant == "q4_0" and key in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        return types.Q8_0
    return {"bf16": types.BF16, "f16": types.F16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[quant]


def _float_tensors(model):
    """(Hugging Face name, float tensor) of every weight, the quantized layers dequantized, the tied head written out,
    the fused QKV regrouped from per-head (q, k, v) to all q, all k, all v."""
    from neoxko.quantize import Int8Linear, dequantize
    from neoxko.quantize.int4 import Int4Linear

    config = model.config
    heads, size = config.num_attention_heads, config.head_size
    seen = set()
    for module_name, module in model.named_modules():
        if ".lora_" in module_name:
            raise CheckpointError("the model carries unmerged LoRA layers; load it with its adapter (merged) to export")
        weight = None
        if isinstance(module, Int8Linear):
            weight = dequantize(module)
        elif isinstance(module, Int4Linear):
            weight = module.float_weight()
        elif isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)):
            weight = module.weight.detach()
        if weight is None:
            continue
        tensors = [("weight", weight)]
        if getattr(module, "bias", None) is not None:
            tensors.append(("bias", module.bias.detach()))
        for kind, tensor in tensors:
            key = f"{module_name}.{kind}"
            if module_name.endswith("attention.query_key_value"):
                tensor = tensor.reshape(heads, 3, size, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
            seen.add(key)
            yield key, tensor.float()
    if "embed_out.weight" not in seen:  # (a module shared with the embedding is named once)
        yield "embed_out.weight", model.gpt_neox.embed_in.weight.detach().float()


def _add_tokenizer(gguf, writer, model) -> None:
    folder = Path(getattr(model, "source_folder", None) or "")
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json to write into the GGUF file; copy the model's "
                              "tokenizer files (tokenizer.json, tokenizer_config.json) into it")
    spec = json.loads(file.read_text(encoding="utf-8"))
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") not in ("ByteLevel", "Sequence"):
        raise CheckpointError(f"{file} is not a byte-level BPE tokenizer; llama.cpp's GPT-NeoX files carry one")
    vocab_size = model.config.vocab_size
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for token, i in bpe["vocab"].items():
        _place(tokens, i, token, file)
    privacy = set(PII_TOKENS.values())
    for added in spec.get("added_tokens", []):
        i, token = added["id"], added["content"]
        _place(tokens, i, token, file, replace=True)
        types[i] = gguf.TokenType.USER_DEFINED if token in privacy or not added.get("special") \
            else gguf.TokenType.CONTROL
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # (GPT-2's split: Polyglot-Ko's ByteLevel pre-tokenizer with its regex)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = model.config
    eos = config.eos_token_id if config.eos_token_id is not None else _id(spec, "<|endoftext|>")
    bos = config.bos_token_id if config.bos_token_id is not None else eos
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
        writer.add_pad_token_id(eos)  # (GPT-NeoX has no pad token: eos pads, as transformers pads it)
    writer.add_add_bos_token(False)  # (GPT-NeoX text starts without one, as neoxko and transformers encode it)
    writer.add_add_eos_token(False)
    template = tokenizer_template(folder)
    if template:
        writer.add_chat_template(template)


def _place(tokens: list, i: int, token: str, file: Path, replace: bool = False) -> None:
    if not 0 <= i < len(tokens):
        raise CheckpointError(f"{file} has token {token!r} at id {i}, outside the model's vocabulary of "
                              f"{len(tokens)}; this tokenizer is not the model's")
    if tokens[i] is not None and not replace and tokens[i] != token:
        raise CheckpointError(f"{file} gives id {i} to both {tokens[i]!r} and {token!r}")
    tokens[i] = token


def _id(spec: dict, token: str) -> int | None:
    return next((a["id"] for a in spec.get("added_tokens", []) if a["content"] == token), None)


def _llama_quantize(model, path: Path, name: str | None) -> Path:
    """q4_k_m: llama.cpp's own quantizer (K-quants have no writer in the gguf package) over an f16 file."""
    try:
        import llama_cpp
    except ImportError:
        raise CheckpointError("q4_k_m is made by llama.cpp's quantizer: pip install llama-cpp-python (or write "
                              "q4_0, q8_0, f16 or bf16, which neoxko writes itself)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        f16 = write_gguf(model, Path(tmp) / "f16.gguf", "f16", name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params) != 0:
            raise CheckpointError(f"llama.cpp's quantizer could not write {path} as q4_k_m (its log above says why)")
    return path


def detect(path: Path) -> bool:
    """Whether path is a GGUF file (by its magic bytes, not its name)."""
    return is_gguf(Path(path))


def read_gguf(path: str | Path, folder: str | Path) -> Path:
    """A GGUF file of a GPT-NeoX model (ours, llama.cpp's converter's or quantizer's, any quantization) written as a
    Hugging Face folder: config.json, model.safetensors (every quantized tensor dequantized by the gguf package; in
    bf16 or f16 where the file's matrices all are, else float32) and tokenizer.json rebuilt from the file's byte-level
    BPE vocabulary and merges."""
    from safetensors.torch import save_file

    from neoxko.config import ModelConfig

    gguf = _gguf()
    path, folder = Path(path), Path(folder)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from None
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path} holds a {arch!r} model; neoxko reads GPT-NeoX ({ARCH!r}) GGUF files")
    key = lambda name: fields[f"{ARCH}.{name}"]  # noqa: E731
    tokens = fields.get("tokenizer.ggml.tokens") or []
    heads, width = key("attention.head_count"), key("embedding_length")
    names = {t.name for t in reader.tensors}
    config = ModelConfig(
        vocab_size=len(tokens), hidden_size=width, num_hidden_layers=key("block_count"), num_attention_heads=heads,
        intermediate_size=key("feed_forward_length"), max_position_embeddings=key("context_length"),
        rotary_pct=key("rope.dimension_count") / (width // heads), rotary_emb_base=float(fields.get(
            f"{ARCH}.rope.freq_base", 10000.0)), layer_norm_eps=float(key("attention.layer_norm_epsilon")),
        use_parallel_residual=bool(fields.get(f"{ARCH}.use_parallel_residual", True)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"), eos_token_id=fields.get("tokenizer.ggml.eos_token_id"))
    back = {}  # llama.cpp's tensor names -> ours
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, config.num_hidden_layers)
    with torch.device("meta"):
        from neoxko.model import GPTNeoX

        expected = GPTNeoX(config).state_dict()
    for ours in expected:
        theirs = table.get_name(ours, try_suffixes=(".weight", ".bias"))
        if theirs is not None:
            back[theirs] = ours
    state = {}
    size = width // heads
    types = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    # the file's own precision where its matrices all have one that safetensors holds; else float32 (exact for every
    # quantization's values)
    dtype = {gguf.GGMLQuantizationType.BF16: torch.bfloat16, gguf.GGMLQuantizationType.F16: torch.float16}.get(
        next(iter(types)), torch.float32) if len(types) == 1 else torch.float32
    for tensor in reader.tensors:
        ours = back.get(tensor.name)
        if ours is None:
            raise CheckpointError(f"{path} holds tensor {tensor.name!r}, which neoxko's GPT-NeoX has no place for")
        data = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32))
        data = data.reshape(expected[ours].shape).float()
        if ours.endswith("attention.query_key_value.weight") or ours.endswith("attention.query_key_value.bias"):
            data = data.reshape(3, heads, size, *data.shape[1:]).transpose(0, 1).reshape(data.shape)  # per head again
        state[ours] = data.contiguous()
    head, embedding = state.get("embed_out.weight"), state.get("gpt_neox.embed_in.weight")
    if head is not None and embedding is not None and torch.equal(head, embedding):  # (written out for llama.cpp)
        config = dataclasses.replace(config, tie_word_embeddings=True)
    if config.tie_word_embeddings:
        state.pop("embed_out.weight", None)
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    missing = sorted(set(expected) - set(state) - ({"embed_out.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing[:3])}; it is not a whole GPT-NeoX model")
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / "config.json", dtype=str(dtype).removeprefix("torch."))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _write_tokenizer(gguf, fields, path, folder, config.max_position_embeddings)
    return folder


def _write_tokenizer(gguf, fields: dict, path: Path, folder: Path, max_length: int) -> None:
    """tokenizer.json (and tokenizer_config.json) from the file's vocabulary: byte-level BPE with GPT-2's split."""
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{path} has a {fields.get('tokenizer.ggml.model')!r} tokenizer; neoxko rebuilds "
                              "byte-level BPE ('gpt2') tokenizers only")
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or []
    kinds = gguf.TokenType
    vocab, added = {}, []
    for i, token in enumerate(tokens):
        kind = types[i] if i < len(types) else kinds.NORMAL
        if kind in (kinds.CONTROL, kinds.USER_DEFINED):
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == kinds.CONTROL or token in PII_TOKENS.values()})
        if kind != kinds.UNUSED:
            vocab.setdefault(token, i)
    merges = [m.split(" ", 1) for m in fields.get("tokenizer.ggml.merges") or []]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": max_length,
              "additional_special_tokens": [a["content"] for a in added if a["special"]]}
    if eos is not None and eos < len(tokens):
        config["eos_token"] = tokens[eos]
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = fields["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
