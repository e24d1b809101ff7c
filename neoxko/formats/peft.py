"""LoRA adapters in peft's format (ours or peft's): an adapter folder names its base; applying one merges it into the
float weights (finetune/lora.py does the work)."""

from pathlib import Path

from neoxko.formats.locate import adapter_base


def detect(folder: Path) -> Path | None:
    """The base model folder of an adapter folder, else None."""
    return adapter_base(folder)


def apply(model, folder: Path, merge: bool = True):
    from neoxko.finetune.lora import load_adapter

    return load_adapter(model, folder, merge=merge)
