"""Training checkpoints from elsewhere: a crafted .metadata or optimizer value is refused on resume (one rank and
two) and on export without its code running; commits fsync before they rename; meta.json lists DCP's files."""

import builtins
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neoxko.config import ModelConfig
from neoxko.errors import CheckpointError
from neoxko.model import GPTNeoX
from neoxko.train import checkpoint
from neoxko.train.config import TrainConfig
from neoxko.train.loop import train

TINY = {"vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}


def settings(shards: Path, out: Path, **changes) -> dict:
    base = dict(model=TINY, data=[str(shards)], seq_len=32, micro_batch=2, global_batch=4, max_steps=2, lr=3e-3,
                warmup_steps=1, out_dir=str(out), log_every=1, save_every=2, eval_every=0)
    return base | changes


class Payload:
    """Unpickles as a call of `run` (os.system, builtins.exec) that creates `marker`."""

    def __init__(self, run, marker: Path):
        self.run, self.marker = run, marker

    def __reduce__(self):
        if self.run is os.system:
            return os.system, (f"touch '{self.marker}'",)
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def live(payload: Payload) -> Payload:
    """The payload, after checking that plain pickle runs it (so a refusal is not a broken payload's)."""
    probe = payload.marker.with_suffix(".probe")
    pickle.loads(pickle.dumps(Payload(payload.run, probe)))
    assert probe.exists()
    probe.unlink()
    return payload


def rewrite_digests(step: Path) -> None:
    """What a forger does: meta.json's digests made to match the files, so the digest check passes."""
    meta = json.loads((step / "meta.json").read_text())
    meta["files"] = {name: checkpoint._digest(step / name) for name in meta["files"]}
    (step / "meta.json").write_text(json.dumps(meta))


def craft_metadata(step: Path, payload: Payload) -> None:
    """The real .metadata with the payload inside it, after the classes DCP writes."""
    metadata = pickle.loads((step / ".metadata").read_bytes())
    metadata.storage_meta.modules = [live(payload)]
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_digests(step)


def latest_step(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_crafted_metadata_is_refused_on_resume_and_export_and_never_runs(shards, tmp_path):
    train(TrainConfig(**settings(shards, tmp_path / "run")))
    step = latest_step(tmp_path / "run")
    for run, name in [(os.system, os.system.__module__ + ".system"), (builtins.exec, "builtins.exec")]:
        marker = tmp_path / f"ran-{run.__name__}"
        craft_metadata(step, Payload(run, marker))
        message = (f"{re.escape(str(step / '.metadata'))} asks to unpickle {name}, which .* so nothing of it was "
                   "run; delete the checkpoint \\(it was not written by torch.distributed.checkpoint\\)")
        with pytest.raises(CheckpointError, match=message):
            train(TrainConfig(**settings(shards, tmp_path / "run", max_steps=4)))
        if run is os.system:
            out = subprocess.run([sys.executable, "-m", "neoxko", "export", str(tmp_path / "run"), "--output",
                                  str(tmp_path / "hf")], capture_output=True, text=True)
            assert out.returncode == 2 and f"asks to unpickle {name}," in out.stderr and "Traceback" not in out.stderr
        else:  # the same path in this process (a second command line would only add seconds)
            with pytest.raises(CheckpointError, match=message):
                checkpoint.export(step, tmp_path / "hf")
        assert not marker.exists() and not (tmp_path / "hf").exists()


def test_a_crafted_optimizer_value_is_refused_on_resume_and_never_runs(shards, tmp_path):
    train(TrainConfig(**settings(shards, tmp_path / "run")))
    step = latest_step(tmp_path / "run")
    marker = tmp_path / "ran"
    # DCP stores non-tensor values as torch.save bytes; point the learning rate's entry at a crafted one
    evil = io.BytesIO()
    torch.save(live(Payload(os.system, marker)), evil)
    shard = step / "__0_0.distcp"
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + evil.getvalue())
    metadata = pickle.loads((step / ".metadata").read_bytes())
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    metadata.storage_data[index].offset, metadata.storage_data[index].length = offset, len(evil.getvalue())
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_digests(step)
    with pytest.raises(CheckpointError, match="holds optimizer.param_groups.0.lr as a pickle that asks for "
                                              f"{os.system.__module__}.system, .* so nothing of it was run; "
                                              "delete the checkpoint"):
        train(TrainConfig(**settings(shards, tmp_path / "run", max_steps=4)))
    assert not marker.exists()


def test_damaged_and_foreign_metadata_are_refused_by_name(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata cannot be read \(UnpicklingError: .*\); the checkpoint "
                                              "is damaged: delete it"):
        checkpoint.read_dcp_metadata(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CheckpointError, match="holds a dict, not torch.distributed.checkpoint's Metadata; the checkpoint is "
                                              "damaged"):
        checkpoint.read_dcp_metadata(tmp_path)


def torchrun(cfg: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "neoxko", "train", *[f"{k}={json.dumps(v)}" for k, v in cfg.items()]]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_two_ranks_list_their_files_from_the_metadata_and_both_refuse_a_crafted_one(shards, tmp_path):
    cfg = settings(shards, tmp_path / "run", global_batch=8, parallel="fsdp")
    out = torchrun(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    step = latest_step(tmp_path / "run")
    assert set(json.loads((step / "meta.json").read_text())["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    marker = tmp_path / "ran"
    craft_metadata(step, Payload(os.system, marker))
    out = torchrun(cfg | {"max_steps": 4})
    assert out.returncode != 0 and out.stderr.count(f"asks to unpickle {os.system.__module__}.system,") == 2
    assert not marker.exists()


def test_a_commit_fsyncs_files_and_folders_before_each_rename_and_the_parent_after(tmp_path, monkeypatch):
    model = GPTNeoX(ModelConfig(**TINY))
    optimizer = torch.optim.AdamW(model.parameters())
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src), str(dst))),
                                                         real_replace(src, dst)))
    for asynchronous in (False, True):
        events.clear()
        saver = checkpoint.Checkpointer(tmp_path / str(asynchronous), asynchronous=asynchronous)
        saver.save(model, optimizer, 1)
        saver.wait()
        root = str(tmp_path / str(asynchronous) / "checkpoints")
        tmp, step = f"{root}/.step-0000001.tmp", f"{root}/step-0000001"
        ours = [e for e in events if e[0] == "replace" or (e[1].startswith(root) and not e[1].endswith(".metadata.tmp"))]
        assert ours[-9:] == [("fsync", f"{tmp}/__0_0.distcp"), ("fsync", f"{tmp}/.metadata"),
                             ("fsync", f"{tmp}/meta.json"), ("fsync", tmp), ("replace", tmp, step), ("fsync", root),
                             ("fsync", f"{root}/latest.tmp"), ("replace", f"{root}/latest.tmp", f"{root}/latest"),
                             ("fsync", root)]
        meta = checkpoint.read_meta(Path(step))
        assert sorted(meta["files"]) == [".metadata", "__0_0.distcp"]
        checkpoint.verify(Path(step), meta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_checkpoints_of_other_dtypes_pass_the_metadata_allow_list_and_load_back(tmp_path, dtype):
    saved, loaded = (GPTNeoX(ModelConfig(**TINY)).to(dtype) for _ in range(2))
    step = checkpoint.Checkpointer(tmp_path).save(saved, torch.optim.AdamW(saved.parameters()), 3)
    assert checkpoint.load(step, loaded, torch.optim.AdamW(loaded.parameters())) == 3
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
