"""Sharded training checkpoints with torch.distributed.checkpoint: each rank writes only its shards,
and any world size or sharding reads them back (DCP reshards on load).

Layout: OUT/checkpoints/step-0000100/ holds DCP's `.metadata` and `__R_I.distcp` files plus our
`meta.json` (step, world, model config, an xxh3-128 digest per file). All ranks write into a hidden
`.step-0000100.tmp`; only when every rank has finished and its digests are gathered does rank 0 write
meta.json, rename the folder and then replace `latest` (with async saving: at the next save or the
end). A rank killed mid-save leaves the previous checkpoint as latest. On load the ranks verify the
digests between them, each a share of the files.
"""

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from neoxko.config import ModelConfig
from neoxko.errors import CheckpointError
from neoxko.model import GPTNeoX

FORMAT = "neoxko-dcp-1"


class Checkpointer:
    """Writes checkpoints of one run. With asynchronous, DCP stages the state to host memory and writes it
    in a background thread while training goes on; the checkpoint is finalised (digests, meta.json,
    rename, latest) by wait(), which the next save and the end of the run call on every rank."""

    def __init__(self, out: Path, keep: int = 2, asynchronous: bool = False, trainable_only: bool = False,
                 job: dict | None = None):
        self.root, self.keep, self.asynchronous = out / "checkpoints", keep, asynchronous
        self.trainable_only = trainable_only  # LoRA: the adapters and their optimizer state, not the frozen base
        self.job = job  # what trains (fine-tuning's method and LoRA shape), in meta.json, checked on resume
        self.pending = None
        # the background writes' collectives get a gloo group of their own, apart from training's
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None

    def save(self, model, optimizer, step: int) -> Path:
        """Every rank writes its shards of model and optimizer state; returns the checkpoint's folder."""
        self.wait()
        rank, world = _rank_world()
        name = f"step-{step:07d}"
        tmp = self.root / f".{name}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state = {"model": model_state(model, self.trainable_only),
                 "optimizer": get_optimizer_state_dict(model, optimizer)}
        with _single_process_quiet():
            if self.asynchronous:
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group)
            else:
                dcp.save(state, checkpoint_id=tmp, no_dist=world == 1)
                future = None
        self.pending = (future, tmp, step, model.config)
        if not self.asynchronous:
            self.wait()
        return self.root / name

    def wait(self) -> None:
        """Finish the pending checkpoint, if any: digests from every rank, then meta.json, rename, latest."""
        if self.pending is None:
            return
        future, tmp, step, config = self.pending
        self.pending = None
        if future is not None:
            future.result()
        rank, world = _rank_world()
        # DCP names each rank's data __RANK_I.distcp; the coordinator (rank 0) writes .metadata.
        mine = sorted(tmp.glob(f"__{rank}_*")) + ([tmp / ".metadata"] if rank == 0 else [])
        gathered = [{f.name: _digest(f) for f in mine}]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, {f.name: _digest(f) for f in mine})
        if rank == 0:
            self._commit(tmp, step, world, config, {k: v for d in gathered for k, v in d.items()})
        _barrier()

    def _commit(self, tmp: Path, step: int, world: int, config: ModelConfig, files: dict) -> None:
        name = tmp.name.removeprefix(".").removesuffix(".tmp")
        meta = {"format": FORMAT, "step": step, "world_size": world, "model_config": config.to_hf(), "files": files}
        if self.job is not None:
            meta["job"] = self.job
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(self.root / name, ignore_errors=True)
        os.replace(tmp, self.root / name)
        (self.root / "latest.tmp").write_text(name + "\n")
        os.replace(self.root / "latest.tmp", self.root / "latest")
        for old in sorted(p for p in self.root.glob("step-*") if p.is_dir())[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not re.fullmatch(r"step-\d{7,}", name):  # never a path out of the run folder
        raise CheckpointError(f"{pointer} holds {name[:80]!r}, not a checkpoint name like step-0000100; "
                              "write the name of one of the checkpoints/step-* folders into it")
    folder = out / "checkpoints" / name
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which is missing; remove {pointer} to start over")
    return folder


def read_meta(folder: Path) -> dict:
    meta_file = folder / "meta.json"
    if (folder / "state.pt").is_file():
        raise CheckpointError(f"{folder} is a checkpoint of neoxko 0.1's unsharded format; resume it with "
                              "neoxko 0.1, or start a new run with init=checkpoint from its exported model")
    if not meta_file.is_file() or not (folder / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete (needs .metadata and meta.json); "
                              "delete it and point checkpoints/latest at an earlier one")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_file} is not valid JSON; the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_file} is not a neoxko sharded checkpoint (format {found!r})")
    missing = [k for k, kind in (("step", int), ("model_config", dict), ("files", dict))
               if not isinstance(meta.get(k), kind)]
    if missing:
        raise CheckpointError(f"{meta_file} lacks {', '.join(missing)} (or holds the wrong type); the checkpoint is "
                              "damaged: delete it and point checkpoints/latest at an earlier one")
    return meta


def verify(folder: Path, meta: dict, alone: bool = False) -> None:
    """Check every file against its digest, the files split over the ranks (all raise alike), or all
    of them in this process alone."""
    rank, world = (0, 1) if alone else _rank_world()
    names = sorted(meta["files"])
    bad = [n for n in names[rank::world]
           if not (folder / n).is_file() or _digest(folder / n) != meta["files"][n]]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, bad)
        bad = sorted(n for b in everyone for n in b)
    if bad:
        raise CheckpointError(f"checkpoint {folder} is corrupted: {', '.join(bad[:3])} do(es) not match the digests "
                              "in meta.json; delete it and point checkpoints/latest at an earlier one")


def model_state(model, trainable_only: bool = False) -> dict:
    """The model's state dict (DCP's view of it); trainable_only keeps the parameters that train."""
    state = get_model_state_dict(model)
    if not trainable_only:
        return state
    from neoxko.train.build import plain_name

    trainable = {plain_name(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if plain_name(k) in trainable}


def load(folder: Path, model, optimizer, trainable_only: bool = False, job: dict | None = None) -> int:
    """Restore this rank's shards of model and optimizer state; returns the step it was saved at."""
    meta = read_meta(folder)
    check_same_model(folder, meta, model.config)
    if meta.get("job") != job:
        raise CheckpointError(f"checkpoint {folder} was saved by a run that trains {_job(meta.get('job'))}, but this "
                              f"run trains {_job(job)}; use a new out_dir, or the settings it was run with")
    verify(folder, meta)
    state = {"model": model_state(model, trainable_only), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not trainable_only))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return int(meta["step"])


def _job(job: dict | None) -> str:
    return "every parameter (pretraining)" if job is None else ", ".join(f"{k} {v}" for k, v in job.items())


def check_same_model(folder: Path, meta: dict, config: ModelConfig) -> None:
    saved = ModelConfig.from_hf(meta["model_config"])
    if saved != config:
        diff = [f"{k} {v} (run: {config.to_hf()[k]})" for k, v in saved.to_hf().items() if config.to_hf().get(k) != v]
        raise CheckpointError(f"checkpoint {folder} is of another model: {', '.join(diff)}; use a new out_dir or "
                              "the model settings it was trained with")


def export(folder: Path, dest: Path, tokenizer: str | Path | None = None) -> Path:
    """Write a Hugging Face folder from a sharded checkpoint in this process alone, reading the model's
    tensors only (never the optimizer state). The folder appears complete or not at all."""
    from neoxko.checkpoint import save_model

    meta = read_meta(folder)
    verify(folder, meta, alone=True)
    with torch.device("meta"):
        model = GPTNeoX(ModelConfig.from_hf(meta["model_config"]))
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.setup_rope("cpu")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer=tokenizer)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save and load, which is what no_dist asks for (an async save
    warns from its writer thread, so the filter is process-wide and matches that one message only)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    yield


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
