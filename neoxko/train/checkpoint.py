"""Sharded training checkpoints with torch.distributed.checkpoint: each rank writes only its shards,
and any world size or sharding reads them back (DCP reshards on load).

Layout: OUT/checkpoints/step-0000100/ holds DCP's `.metadata` and `__R_I.distcp` files plus our
`meta.json` (step, world, model config, an xxh3-128 digest per file). All ranks write into a hidden
`.step-0000100.tmp`; when the save is done the ranks digest the files `.metadata` lists, each a share, and
rank 0 writes meta.json, renames the folder and then replaces `latest` (with async saving: at the next save
or the end). Every file and folder is fsynced before the rename that commits it, so a power cut leaves the
previous checkpoint as latest, as a rank killed mid-save does. On load the ranks verify the digests between
them, each a share of the files.

A checkpoint may come from elsewhere, so loading unpickles nothing freely: `.metadata` is read by an
unpickler that admits DCP's metadata classes only, and the non-tensor values (the optimizer's settings) by
torch's weights-only one; DCP's own reader and planner would run plain pickle on both.
"""

import json
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader, Metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta
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
        # DCP's coordinator writes .metadata last, before the save returns (or its future completes) on any rank
        names = checkpoint_files(read_dcp_metadata(tmp))
        mine = {}
        for name in names[rank::world]:
            _fsync(tmp / name)
            mine[name] = _digest(tmp / name)
        gathered = [mine]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
        if rank == 0:
            self._commit(tmp, step, world, config, {k: v for d in gathered for k, v in d.items()})
        _barrier()

    def _commit(self, tmp: Path, step: int, world: int, config: ModelConfig, files: dict) -> None:
        name = tmp.name.removeprefix(".").removesuffix(".tmp")
        meta = {"format": FORMAT, "step": step, "world_size": world, "model_config": config.to_hf(), "files": files}
        if self.job is not None:
            meta["job"] = self.job
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _fsync(tmp / "meta.json")
        shutil.rmtree(self.root / name, ignore_errors=True)
        _replace(tmp, self.root / name)
        (self.root / "latest.tmp").write_text(name + "\n")
        _replace(self.root / "latest.tmp", self.root / "latest")
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
    from neoxko.train.names import plain_name

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
    read_state(folder, state, no_dist=not dist.is_initialized())
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
    read_state(folder, state)
    model.setup_rope("cpu")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer=tokenizer)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def read_state(folder: Path, state: dict, no_dist: bool = True) -> None:
    """Fill `state` (DCP's nested state dict) from a checkpoint, unpickling nothing that DCP does not write."""
    reader = _MetadataReader(folder, read_dcp_metadata(folder))
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner(folder), no_dist=no_dist)
    except CheckpointException as e:  # DCP gathers every rank's exception into one; ours says what to do
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
        if not refused:
            raise
        raise refused[0] from None


def checkpoint_files(metadata: Metadata) -> list[str]:
    """The files a DCP checkpoint consists of, as its metadata lists them."""
    return sorted({info.relative_path for info in metadata.storage_data.values()}) + [".metadata"]


# What a .metadata pickle names, logged from the checkpoints the tests save (one process; DDP, FSDP and HSDP
# ranks; sync and async; pretraining, LoRA and full fine-tuning, all with optimizer state); dtypes by name.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a tensor's layout, looked up by its name
    "torch": {"Size"},
    "pathlib": {"PosixPath"},  # StorageMeta.checkpoint_id (pathlib._local from Python 3.13)
    "pathlib._local": {"PosixPath"},
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves the globals METADATA_GLOBALS names and torch's dtypes; refuses any other before importing it."""

    def find_class(self, module: str, name: str):
        # vars(torch), not getattr: torch's module __getattr__ would import whatever submodule is named
        if name in METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(vars(torch).get(name), torch.dtype)):
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name}")


def read_dcp_metadata(folder: Path) -> Metadata:
    """DCP's .metadata, unpickled with only DCP's metadata classes admitted: a crafted file runs nothing."""
    path = folder / ".metadata"
    todo = "delete it and point checkpoints/latest at an earlier one"
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _ForbiddenGlobal as e:
        raise CheckpointError(f"{path} asks to unpickle {e}, which torch.distributed.checkpoint's metadata never "
                              "holds, so nothing of it was run; delete the checkpoint (it was not written by "
                              "torch.distributed.checkpoint) and point checkpoints/latest at an earlier one") from None
    except Exception as e:  # whatever a damaged pickle raises
        reason = str(e).partition("\n")[0]
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {reason}); the checkpoint is damaged: "
                              f"{todo}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not torch.distributed.checkpoint's "
                              f"Metadata; the checkpoint is damaged: {todo}")
    return metadata


class _MetadataReader(FileSystemReader):
    """DCP's file reader, handed the metadata read_dcp_metadata parsed (its own unpickles with plain pickle)."""

    def __init__(self, folder: Path, metadata: Metadata):
        super().__init__(folder)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        # as FileSystemReader.read_metadata after its pickle.load: the metadata carries this load's id
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, but it reads the non-tensor values (the optimizer's settings: floats, tuples, names)
    with torch's weights-only unpickler; DCP's own load_bytes calls torch.load(weights_only=False)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise CheckpointError(f"checkpoint {self.folder} holds {fqn} as a pickle that asks for "
                                  f"{found[1] if found else 'a global'}, which torch.distributed.checkpoint never "
                                  "writes, so nothing of it was run; delete the checkpoint (it was not written by "
                                  "torch.distributed.checkpoint) and point checkpoints/latest at an earlier one"
                                  ) from None
        set_element(self.original_state_dict, self.mappings[fqn], obj)  # where DefaultLoadPlanner puts it


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(src: Path, dst: Path) -> None:
    """os.replace that a power cut cannot undo or expose half-written: src is on disk before the rename, the
    rename before this returns (src's own files must have been fsynced already)."""
    _fsync(src)
    os.replace(src, dst)
    _fsync(dst.parent)


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
