"""Training checkpoints: full (unsharded) model and optimizer state, written atomically, checked on load.

Layout: OUT/checkpoints/step-0000100/{state.pt, meta.json} and OUT/checkpoints/latest (the newest
step folder's name). A step folder is written under a temporary name and renamed when complete, and
`latest` is replaced atomically after it, so a crash mid-save leaves the previous checkpoint in force.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from neoxko.errors import CheckpointError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save(out: Path, model, optimizer, step: int, rank: int, keep: int = 2) -> None:
    """Every rank takes part in gathering the state; rank 0 writes it."""
    state = {"model": get_model_state_dict(model, options=FULL),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL), "step": step}
    if rank == 0:
        root = out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:07d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "sha256": _sha256(tmp / "state.pt")}) + "\n")
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        (root / "latest.tmp").write_text(name + "\n")
        os.replace(root / "latest.tmp", root / "latest")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def latest(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = out / "checkpoints" / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which is missing; remove {pointer} to start over")
    return folder


def load(folder: Path, model, optimizer) -> int:
    """Restore model and optimizer (every rank reads the full state); returns the step it was saved at."""
    meta_file, state_file = folder / "meta.json", folder / "state.pt"
    if not meta_file.is_file() or not state_file.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete (needs state.pt and meta.json); "
                              "delete it and point checkpoints/latest at an earlier one")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_file} is not valid JSON; the checkpoint is damaged") from None
    if _sha256(state_file) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {folder} is corrupted: state.pt does not match the checksum in "
                              "meta.json; delete it and point checkpoints/latest at an earlier one")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    set_model_state_dict(model, state["model"], options=FULL)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=FULL)
    return int(state["step"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
