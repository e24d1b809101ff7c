"""Storage formats, each in one module: where a model's files are (locate.py, torch-free), float Hugging Face folders
(hf.py), neoxko's int8 and int4 folders (int8.py, int4.py), LoRA adapters (peft.py) and llama.cpp's GGUF (gguf.py:
written from a model, read back into a float folder). checkpoint.load_model resolves a name, reads the folder in the
format its config.json names, applies an adapter, then a quantization, all through this registry: a new format is
one module and one line below."""

import importlib
from pathlib import Path

from neoxko.errors import CheckpointError

QUANTIZED = ("int8", "int4")  # the formats a float model can be quantized to, and that folders can store


def quantized(name: str):
    """The quantized format called name (int8, int4)."""
    if name not in QUANTIZED:
        raise CheckpointError(f"unknown quantization {name!r}; the ones supported are {' and '.join(QUANTIZED)}")
    return importlib.import_module(f"neoxko.formats.{name}")


def stored(folder: Path, quant: dict):
    """The format of a folder whose config.json has this quantization_config: hf (float) or a quantized one."""
    if not quant:
        return importlib.import_module("neoxko.formats.hf")
    for name in QUANTIZED:
        module = quantized(name)
        if module.detect(quant):
            if quant.get("bits", module.BITS) != module.BITS:
                raise CheckpointError(f"{folder}/config.json's quantization_config says {module.METHOD} with bits "
                                      f"{quant.get('bits')!r}; that layout holds {module.BITS}-bit weights only")
            return module
    raise CheckpointError(f"{folder} is quantized with {quant.get('quant_method')!r}, which neoxko cannot read; "
                          f"load the unquantized checkpoint (and pass --quantize int8)")
