"""neoxko's int8 folder (quant_method neoxko_int8): weight-only int8 per output channel, written by `neoxko quantize`
and `--quantize int8`. The tensors are read through hf.py; this module knows the layout's config and modules."""

from pathlib import Path

from neoxko.errors import CheckpointError

NAME, METHOD, BITS = "int8", "neoxko_int8", 8


def detect(quant: dict) -> bool:
    return quant.get("quant_method") == METHOD


def check(folder: Path, quant: dict, device, requested: str | None) -> None:
    """Refuse, by name, what this folder cannot be loaded as (its bits are checked by the registry)."""
    if requested == "int4":
        raise CheckpointError(f"{folder} is already int8; int4 quantizes from the float checkpoint")


def build(model, quant: dict, kernel: bool | None) -> None:
    """Swap the (meta) model's linear layers for empty int8 ones, as the file lays them out."""
    from neoxko.quantize import quantize_model

    quantize_model(model, empty=True, tied_head=quant.get("tied_head", "int8"), kernel=kernel)


def tied(config, quant: dict) -> bool:
    """Whether the head shares the embedding (files before neoxko 0.2 quantized a tied head to int8)."""
    return config.tie_word_embeddings and quant.get("tied_head", "int8") == "float"


def quantize(model, group_size: int) -> None:
    from neoxko.quantize import quantize_model

    quantize_model(model)


def config(model) -> dict:
    from neoxko.quantize import QUANTIZATION_CONFIG

    tied_head = getattr(model, "tied_head", None)
    return QUANTIZATION_CONFIG | ({"tied_head": tied_head} if tied_head else {})
