"""Models shipped inside the package, by name; commands use DEFAULT_MODEL when --model is not given."""

from pathlib import Path

BUILTIN = {"ko-small": Path(__file__).parent / "ko-small",
           "ko-small-chat": Path(__file__).parent / "ko-small-chat"}  # a LoRA adapter on ko-small
DEFAULT_MODEL = "ko-small"
MODEL_HELP = f"model folder, hub id or built-in name (default: the built-in {DEFAULT_MODEL})"
