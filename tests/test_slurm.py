"""The README's Slurm training script on a real two-node Slurm cluster (tests/cluster/slurm.py: slurmctld, two
slurmd, munged, all on this host): HSDP 2 nodes x 2 ranks equals one process; a stop signal as Slurm delivers
it saves one checkpoint and the job ends COMPLETED; a lost node fails the job and the resubmitted job resumes
to the same losses."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from neoxko.train.config import TrainConfig
from neoxko.train.loop import train

sys.path.insert(0, str(Path(__file__).parent / "cluster"))
import slurm as local_slurm  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slurm]

README = Path(__file__).parents[1] / "README.md"
TINY = {"vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def readme_script(**sizes) -> str:
    """The README's sbatch script, with the allocation's sizes substituted (a real cluster's are larger)."""
    block = re.search(r"```bash\n(#!/bin/bash\n#SBATCH --nodes 32.*?)```", README.read_text(), re.S).group(1)
    sizes = {"nodes": 2, "gpus-per-node": 0, "cpus-per-task": 2} | sizes
    for option, value in sizes.items():
        block, n = re.subn(rf"--{option}[ =]\S+", f"--{option} {value}", block, count=1)
        assert n == 1, option
    return block


def settings(shards: Path, out: Path, **changes) -> dict:
    base = dict(model=TINY, data=[str(shards)], seq_len=32, micro_batch=2, global_batch=8, max_steps=6, lr=3e-3,
                min_lr=3e-3, warmup_steps=2, out_dir=str(out), log_every=1, save_every=1000, check_memory=False)
    return base | changes


def submit(cluster, folder: Path, cfg: dict, nproc: int = 2, sbatch: tuple[str, ...] = (), **sizes) -> str:
    """sbatch the README's script with NPROC ranks a node and this run's config; returns the job id."""
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "train.sbatch").write_text(readme_script(**sizes))
    env = {"NPROC": str(nproc), "CONFIG": str(folder / "run.yaml"), "DATA": cfg["data"][0],
           "PORT": str(local_slurm.free_ports(1)[0])}
    out = cluster.run("sbatch", "--parsable", *sbatch, "--chdir", str(folder), "--output", str(folder / "slurm-%j.out"),
                      *[f"--export=ALL,{','.join(f'{k}={v}' for k, v in env.items())}"], str(folder / "train.sbatch"))
    return out.stdout.strip().split(";")[0]


def job_state(cluster, job: str) -> tuple[str, str]:
    info = cluster.run("scontrol", "show", "job", job).stdout
    return re.search(r"JobState=(\S+)", info).group(1), re.search(r"ExitCode=(\S+)", info).group(1)


def wait_job(cluster, job: str, folder: Path, timeout: float = 240) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while (state := job_state(cluster, job))[0] not in ENDED:
        if time.monotonic() > deadline:
            cluster.run("scancel", job, check=False)
            pytest.fail(f"job {job} still {state[0]} after {timeout:.0f} s: {_log(folder, job)[-3000:]}")
        time.sleep(0.5)
    return state


def _log(folder: Path, job: str) -> str:
    path = folder / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job log)"


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").open()]


def log_rows(out: Path) -> int:
    path = out / "log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_rows(out: Path, rows: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while log_rows(out) < rows:
        assert time.monotonic() < deadline, f"{out}/log.jsonl has {log_rows(out)} rows after {timeout:.0f} s"
        time.sleep(0.1)


def reference(shards: Path, folder: Path, cfg: dict) -> list[float]:
    """The same run in one process (accumulation 4 where the cluster runs 4 ranks)."""
    train(TrainConfig(**cfg | {"out_dir": str(folder / "one")}))
    return losses(folder / "one")


def test_readme_script_trains_hsdp_2_nodes_x_2_ranks_to_one_process_losses(cluster, shards, tmp_path):
    cfg = settings(shards, tmp_path / "run")
    job = submit(cluster, tmp_path, cfg)
    assert wait_job(cluster, job, tmp_path) == ("COMPLETED", "0:0"), _log(tmp_path, job)[-3000:]
    log = _log(tmp_path, job)
    assert "HSDP: dp_replicate 2 x dp_shard 2 = 4 rank(s)" in log
    assert losses(tmp_path / "run") == pytest.approx(reference(shards, tmp_path, cfg), abs=1e-5)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def stop_with(cluster, folder: Path, cfg: dict, signal_args: list[str], after_rows: int) -> int:
    """Submit (one rank a node: what is tested is the signal's path), wait for after_rows log rows, send the
    signal as scancel does; the job must stop, save once at the step it stopped at and end COMPLETED."""
    job = submit(cluster, folder, cfg, nproc=1)
    wait_rows(Path(cfg["out_dir"]), after_rows)
    cluster.run("scancel", *signal_args, job)
    assert wait_job(cluster, job, folder) == ("COMPLETED", "0:0"), _log(folder, job)[-3000:]
    stopped = log_rows(Path(cfg["out_dir"]))
    assert after_rows <= stopped < cfg["max_steps"], _log(folder, job)[-2000:]
    assert f"stopped at step {stopped} (" in _log(folder, job)
    assert (Path(cfg["out_dir"]) / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:07d}"
    return stopped


def test_stop_signals_save_one_checkpoint_complete_and_the_resubmits_resume_exactly(cluster, shards, tmp_path):
    """Signalled as scancel does: the steps with TERM, then the whole job (batch shell and srun too) with USR1;
    the third submission finishes with the losses of an uninterrupted run."""
    cfg = settings(shards, tmp_path / "run", max_steps=60)
    first = stop_with(cluster, tmp_path, cfg, ["--signal=TERM"], 3)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.glob("step-*")] == [f"step-{first:07d}"]  # one save, at the stop
    second = stop_with(cluster, tmp_path, cfg, ["--signal=USR1", "--full"], first + 3)
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [f"step-{first:07d}", f"step-{second:07d}"]
    last = submit(cluster, tmp_path, cfg, nproc=1)
    assert wait_job(cluster, last, tmp_path) == ("COMPLETED", "0:0"), _log(tmp_path, last)[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(reference(shards, tmp_path, cfg), abs=1e-5)


def test_the_time_limit_notice_stops_the_run_with_a_checkpoint_before_the_limit(cluster, shards, tmp_path):
    """--signal=TERM@20 with a 1-minute limit. slurmctld checks time limits every 30 s and sends the notice at
    the first check within 30 s of its due time, so here 10-40 s into the job; a notice due before the step
    starts would reach no process (a limit under N + 40 s). The run saves and the job ends COMPLETED."""
    cfg = settings(shards, tmp_path / "run", max_steps=100_000)
    job = submit(cluster, tmp_path, cfg, nproc=1, sbatch=("--time", "1"), signal="TERM@20")
    state = wait_job(cluster, job, tmp_path, timeout=150)
    log = _log(tmp_path, job)
    assert state == ("COMPLETED", "0:0"), log[-3000:]
    stopped = log_rows(tmp_path / "run")
    assert f"stopped at step {stopped} (" in log
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:07d}"


def _processes_of(job: str, node: str) -> list[int]:
    """PIDs whose environment says they run job's step on node (the launcher and its ranks)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(v.split("=", 1) for v in environ.read_bytes().decode(errors="replace").split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node and "SLURM_STEP_ID" in env \
                and env.get("SLURM_STEP_ID") not in ("batch", "4294967291"):
            pids.append(int(environ.parent.name))
    return pids


def test_a_node_lost_mid_run_fails_the_job_and_the_resubmit_resumes_from_the_last_whole_checkpoint(
        cluster, shards, tmp_path):
    cfg = settings(shards, tmp_path / "run", max_steps=40, save_every=10)
    job = submit(cluster, tmp_path, cfg, nproc=1)
    wait_rows(tmp_path / "run", 25)
    victims = _processes_of(job, "n2")
    assert len(victims) >= 2, victims  # the launcher and its rank
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    state, _ = wait_job(cluster, job, tmp_path)
    assert state == "FAILED", _log(tmp_path, job)[-2000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    latest = (checkpoints / "latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert step >= 20 and step % 10 == 0 and (checkpoints / latest / "meta.json").is_file()
    again = submit(cluster, tmp_path, cfg, nproc=1)
    assert wait_job(cluster, again, tmp_path) == ("COMPLETED", "0:0"), _log(tmp_path, again)[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(reference(shards, tmp_path, cfg), abs=1e-5)


def test_more_ranks_than_the_allocation_gives_a_node_is_refused_once_by_name(cluster, shards, tmp_path):
    job = submit(cluster, tmp_path, settings(shards, tmp_path / "run"), nproc=3)
    assert wait_job(cluster, job, tmp_path)[0] == "FAILED"
    log = _log(tmp_path, job)
    message = (r"3 ranks a node \(--nproc-per-node\) but the allocation gives n[12] 2 CPU\(s\) \(SLURM_CPUS_ON_NODE\); "
               r"set NPROC to at most 2, or ask for more with --cpus-per-task")
    assert log.count("neoxko: error: 3 ranks a node") == 1 and re.search(message, log), log[-3000:]
    assert "Traceback" not in log and "ChildFailedError" not in log  # the launchers add one line each, no traceback
