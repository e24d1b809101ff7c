"""The float format: a Hugging Face folder (config.json, safetensors single or sharded, or .bin), read one tensor at
a time and checked against the model it fills. The quantized formats (int8.py, int4.py) store their tensors the same
way, so they read through here too."""

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError, safe_open

from neoxko.config import ModelConfig
from neoxko.errors import CheckpointError
from neoxko.formats.locate import BIN, BIN_INDEX, SAFETENSORS, SAFETENSORS_INDEX

NAME = "float"
# Buffers that old GPT-NeoX checkpoints carry and that we recompute.
SKIPPED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def quant_config(folder: Path) -> dict:
    """config.json's quantization_config ({} for none), refused by name where neoxko cannot read it."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quant = raw.get("quantization_config") or {}
    if not isinstance(quant, dict) or not isinstance(quant.get("quant_method"), str | None):
        raise CheckpointError(f"{folder}/config.json's quantization_config is {quant!r}, not an object with a "
                              "quant_method; neoxko reads neoxko_int8 and neoxko_int4 (written by neoxko quantize)")
    return quant


def checkpoint_tensors(folder: Path, shapes: dict, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the folder's tensors one at a time under our parameter names, each checked against shapes
    (name -> expected shape, or a meta tensor: its shape and, for integer tensors, its dtype); refuse unknown or
    misshapen tensors, and missing ones at the end."""
    expected = dict(shapes)
    if tied:
        expected.pop("embed_out.weight", None)
    seen = set()
    for name, tensor in read_tensors(folder):
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


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor read in place from a safetensors file starts wherever the header left it; torch's CPU int8
    kernel (and vector loads generally) want 64-byte aligned data, so such a tensor is copied once."""
    return tensor.clone() if tensor.device.type == "cpu" and tensor.data_ptr() % 64 else tensor


def read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
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


def write_tensors(state: dict, folder: Path, max_shard_size: int | str) -> None:
    """safetensors (sharded past max_shard_size) through huggingface_hub, with config.json's file mode."""
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    # huggingface_hub writes through private temporary files (mode 0600): give them config.json's mode
    mode = (folder / "config.json").stat().st_mode & 0o777
    for written in (*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")):
        written.chmod(mode)
