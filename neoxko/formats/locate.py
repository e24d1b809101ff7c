"""Where a model's files are: a local folder, a built-in model, a hub id (fetched into the hub cache), or a LoRA
adapter folder and the base it names. No torch here: the tokenizer, the data pipeline and the CLI's checks resolve
names without loading it."""

import json
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

from neoxko.builtin import BUILTIN
from neoxko.errors import CheckpointError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
HUB_FILES = ["config.json", "*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", BIN_INDEX,
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def resolve(path_or_id: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is, a built-in model by name, else a hub id fetched into (or read from) the hub cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_id) in BUILTIN:
        return BUILTIN[str(path_or_id)]
    if path.exists():
        if is_gguf(path):
            raise CheckpointError(f"{path} is a GGUF file; `neoxko export {path} --format hf --output FOLDER` turns it "
                                  "into a folder neoxko loads")
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    if _local_intent(str(path_or_id)):
        near = path.parent if path.parent.is_dir() else None
        raise CheckpointError(f"{path_or_id}: no such folder" + (
            f" (in {near}: {', '.join(sorted(p.name for p in near.iterdir() if p.is_dir())[:8]) or 'no folders'})"
            if near is not None and str(near) not in ("", ".") else ""))
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


def _local_intent(text: str) -> bool:
    """Whether a name that is no existing folder was meant as a local path, not a hub id: it starts like one (./, ../,
    /, ~) or its first part is a folder here (runs/..., checkpoints/...), or it has more parts than owner/name."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return True
    parts = text.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


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


def is_gguf(path: Path) -> bool:
    """Whether path is a GGUF file: by its first four bytes, not its name."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
