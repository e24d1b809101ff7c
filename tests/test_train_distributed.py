"""Scale-out training under the real launcher (torchrun, gloo on CPU, several processes): accumulation with one
gradient reduction per step, HSDP across two launchers, resharded resume, agreed preemption, kills mid-save,
export, and the launch errors. Each test starts a few small processes; together they take about two minutes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neoxko.errors import ConfigError
from neoxko.train.config import TrainConfig
from neoxko.train.loop import train
from neoxko.train.parallel import ParallelDims

pytestmark = pytest.mark.distributed

TINY = {"vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}
COUNTER = Path(__file__).parent / "helpers" / "count_reductions.py"


def settings(shards: Path, out: Path, **changes) -> dict:
    # constant lr after warmup: a run cut at any step and resumed with more steps follows the same schedule
    base = dict(model=TINY, data=[str(shards)], seq_len=32, micro_batch=2, global_batch=8, max_steps=6, lr=3e-3,
                min_lr=3e-3, warmup_steps=2, out_dir=str(out), log_every=1, save_every=1000, parallel="fsdp")
    return base | changes


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").open()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def torchrun(n: int, cfg: dict, script: list[str] | None = None, **popen) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
            str(free_port()), *(script or ["-m", "neoxko", "train"]), *overrides(cfg)]


def run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def counts(prefix: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{prefix}.{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def one_rank(shards, tmp_path_factory) -> list[float]:
    """The reference: one process, accumulation 4."""
    out = tmp_path_factory.mktemp("one")
    train(TrainConfig(**settings(shards, out)))
    return losses(out)


@pytest.mark.parametrize("parallel,grad_sync", [("ddp", "step"), ("fsdp", "step"), ("fsdp", "micro")])
def test_two_ranks_with_accumulation_2_equal_one_with_4_and_reduce_once_per_step(shards, tmp_path, one_rank,
                                                                                 parallel, grad_sync):
    cfg = settings(shards, tmp_path / "two", parallel=parallel, grad_sync=grad_sync)
    run(torchrun(2, cfg, [str(COUNTER)]), COUNTS=str(tmp_path / "counts"))
    assert losses(tmp_path / "two") == pytest.approx(one_rank, abs=1e-5)
    for c in counts(tmp_path / "counts", 2):
        if parallel == "ddp":  # the tiny model's gradients fit one bucket: one all-reduce per step
            assert c["ddp_allreduce"] == 6 and c["reduce_scatter"] == 0
        elif grad_sync == "step":  # one reduce-scatter per FSDP unit (2 blocks + the root) per step
            assert c["reduce_scatter"] == 6 * 3 and c["ddp_allreduce"] == 0
        else:  # sharded gradients: a reduce-scatter per unit on each of the 2 micro-steps
            assert c["reduce_scatter"] == 6 * 2 * 3


def test_hsdp_2x2_across_two_launchers_equals_one_rank(shards, tmp_path, one_rank):
    cfg = settings(shards, tmp_path / "hsdp", parallel="hsdp")
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", str(COUNTER), *overrides(cfg)]
    env = {**os.environ, "COUNTS": str(tmp_path / "counts")}
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert any("HSDP: dp_replicate 2 x dp_shard 2 = 4 rank(s)" in err for _, err in outputs)
    assert losses(tmp_path / "hsdp") == pytest.approx(one_rank, abs=1e-5)
    for c in counts(tmp_path / "counts", 4):  # reduce-scatter inside a node, all-reduce across: once per step
        assert c["reduce_scatter"] == 6 * 3 and c["hsdp_allreduce"] == 6 * 3


def test_saved_at_world_4_resumes_at_2_and_at_1_with_the_same_losses(shards, tmp_path, one_rank):
    first = settings(shards, tmp_path / "at2", max_steps=3)
    run(torchrun(4, first))
    step = tmp_path / "at2" / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in step.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert json.loads((step / "meta.json").read_text())["world_size"] == 4
    subprocess.run(["cp", "-r", str(tmp_path / "at2"), str(tmp_path / "at1")], check=True)
    run(torchrun(2, first | {"max_steps": 6}))
    train(TrainConfig(**first | {"max_steps": 6, "out_dir": str(tmp_path / "at1")}))
    assert losses(tmp_path / "at2") == pytest.approx(one_rank, abs=1e-5)
    assert losses(tmp_path / "at1") == pytest.approx(one_rank, abs=1e-5)
    # the run went on past its first end, so its export is redone from the new final checkpoint
    assert json.loads((tmp_path / "at1" / "export.json").read_text())["step"] == 6


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for(predicate, seconds: float = 120, every: float = 0.01) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(every)


def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_and_the_resume_is_exact(shards, tmp_path):
    """With async checkpoints every 4 steps, so background saves are in flight when the signal lands."""
    cfg = settings(shards, tmp_path / "cut", max_steps=60, save_every=4, async_checkpoint=True)
    launcher = subprocess.Popen(torchrun(2, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / "log.jsonl"
    _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 5)
    os.kill(_children(launcher.pid)[-1], signal.SIGTERM)  # one rank only, as a node's preemption notice
    start = time.time()
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 0 and time.time() - start < 60, err[-2000:]
    stopped = len(log.read_text().splitlines())
    assert stopped < 60 and f"neoxko: stopped at step {stopped} (" in err and "); saved" in err
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:07d}"
    run(torchrun(2, cfg))
    train(TrainConfig(**cfg | {"out_dir": str(tmp_path / "full")}))
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-5)


def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_loadable(shards, tmp_path):
    # a model big enough that a save takes a while, saved every 2 steps
    model = TINY | {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 1024}
    cfg = settings(shards, tmp_path / "run", model=model, max_steps=12, save_every=2)
    launcher = subprocess.Popen(torchrun(2, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saving = tmp_path / "run" / "checkpoints" / ".step-0000004.tmp"
    _wait_for(saving.exists, every=0.001)
    os.kill(_children(launcher.pid)[-1], signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-0000002" and not (checkpoints / "step-0000004").exists()
    before = losses(tmp_path / "run")
    assert len(before) >= 4  # the kill came during step 4's save
    run(torchrun(2, cfg))  # resumes from step 2 (steps 3-4 and the partial save are redone) to the end
    after = losses(tmp_path / "run")
    assert len(after) == 12 and after[:len(before)] == pytest.approx(before, abs=1e-5)
    assert (checkpoints / "latest").read_text().strip() == "step-0000012"


def test_sharded_checkpoint_exports_to_a_folder_transformers_loads(shards, tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    cfg = settings(shards, tmp_path / "run", max_steps=3)
    run(torchrun(2, cfg))
    out = run([sys.executable, "-m", "neoxko", "export", str(tmp_path / "run"), "--output", str(tmp_path / "hf"),
               "--tokenizer", str(tokenizer_dir)])
    assert "step-0000003" in out.stdout
    from neoxko import load_model

    ours = load_model(tmp_path / "hf")
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)
    # the export is the model the run exported itself at its end
    for name, tensor in load_model(tmp_path / "run" / "model").state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "neoxko", "export", str(tmp_path / "nope"), "--output",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope: no such folder; pass a training run folder" in bad.stderr


def test_bad_parallel_sizes_are_refused_by_name():
    assert ParallelDims.resolve("hsdp", 8, 4) == ParallelDims(2, 4)
    assert ParallelDims.resolve("fsdp", 8, 8, dp_replicate=2, dp_shard=-1) == ParallelDims(2, 4)
    with pytest.raises(ConfigError, match="dp_replicate 3 x dp_shard 2 = 6, but the world size is 4"):
        ParallelDims.resolve("fsdp", 4, 4, dp_replicate=3, dp_shard=2)
    with pytest.raises(ConfigError, match="parallel must be ddp, fsdp or hsdp, got 'tp'"):
        TrainConfig(parallel="tp")


def test_a_missing_rendezvous_is_reported(shards, tmp_path):
    cmd = [sys.executable, "-m", "neoxko", "train", *overrides(settings(shards, tmp_path, dist_timeout_s=3))]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env | {"WORLD_SIZE": "2"})
    assert out.returncode == 2 and "WORLD_SIZE is 2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not set" \
        in out.stderr
    alone = env | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_port())}
    out = subprocess.run(cmd, capture_output=True, text=True, env=alone, timeout=120)
    assert out.returncode == 2 and "rank 0 of 2 could not join the rendezvous at 127.0.0.1:" in out.stderr
    assert "Traceback" not in out.stderr


def test_continued_pretraining_loads_a_hugging_face_folder_into_the_shards(shards, tmp_path, model_dir):
    import torch.nn.functional as F

    from neoxko import load_model
    from neoxko.train.data import Batches

    cfg = settings(shards, tmp_path / "two", model=str(model_dir), init="checkpoint", max_steps=3)
    run(torchrun(2, cfg))
    train(TrainConfig(**cfg | {"out_dir": str(tmp_path / "one")}))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    batch = Batches([str(shards)], None, 32, 0).batch(0, 8)  # step 0's global batch
    x, y = batch.inputs, batch.targets
    with torch.no_grad():
        first = F.cross_entropy(load_model(model_dir)(x).flatten(0, 1), y.flatten()).item()
    assert losses(tmp_path / "two")[0] == pytest.approx(first, abs=1e-5)
