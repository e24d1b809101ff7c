"""neoxko's int4 folder (quant_method neoxko_int4): weight-only int4 in groups of input features with bf16 scales and
zeros, the same bytes on every machine (CPU only). The tensors are read through hf.py."""

from pathlib import Path

import torch

from neoxko.errors import CheckpointError

NAME, METHOD, BITS = "int4", "neoxko_int4", 4


def detect(quant: dict) -> bool:
    return quant.get("quant_method") == METHOD


def check(folder: Path, quant: dict, device, requested: str | None) -> None:
    """Refuse, by name, what this folder cannot be loaded as (its bits are checked by the registry)."""
    from neoxko.quantize import GROUP_SIZES

    stored = quant.get("group_size")
    if stored not in GROUP_SIZES:
        raise CheckpointError(f"{folder}/config.json's quantization_config has group_size {stored!r}; an int4 "
                              f"checkpoint needs one of {', '.join(map(str, GROUP_SIZES))}")
    if torch.device(device).type != "cpu":
        raise CheckpointError(f"{folder} is int4, which runs on the CPU only; load it with device 'cpu', or "
                              "load the float checkpoint (with --quantize int8) on this device")
    if requested == "int8":
        raise CheckpointError(f"{folder} is already int4; int8 quantizes from the float checkpoint")


def build(model, quant: dict, kernel: bool | None) -> None:
    from neoxko.quantize import quantize_model

    quantize_model(model, empty=True, bits=BITS, group_size=quant["group_size"], kernel=kernel)


def tied(config, quant: dict) -> bool:
    return config.tie_word_embeddings  # (a tied head stays float, shared with the embedding)


def quantize(model, group_size: int) -> None:
    from neoxko.quantize import quantize_model

    quantize_model(model, bits=BITS, group_size=group_size)


def config(model) -> dict:
    from neoxko.quantize import int4_config

    return int4_config(model.group_size)
