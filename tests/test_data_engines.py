"""`neoxko data prepare` on real cluster engines: seven dependent array jobs on the local two-node Slurm cluster
(tests/cluster/slurm.py) and tasks on a local Ray cluster, each writing the local executor's shards and report
byte for byte; a killed stage fails the command by name and the rerun resumes; bad input is named."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_data_pipeline as pipeline

sys.path.insert(0, str(Path(__file__).parent / "cluster"))
import slurm as local_slurm  # noqa: E402

pytest.importorskip("datatrove")
pytestmark = pytest.mark.distributed  # several processes: Slurm jobs, Ray workers

# the local executor's run on the same corpus (test_data_pipeline's fixtures)
corpus, tokenizer, finished = pipeline.corpus, pipeline.tokenizer, pipeline.finished


def prepare_args(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "neoxko", "data", "prepare", str(corpus), "--output", str(out), "--tokenizer",
            str(tokenizer), "--workers", "2", "--minhash-buckets", "4",
            "--kobest-dir", str(corpus.parent / (corpus.name + "-kobest")), *extra]


def same_as_local(out: Path, local: Path) -> None:
    assert pipeline._tokens(out) == pipeline._tokens(local) and pipeline._tokens(out)
    assert json.loads((out / "report.json").read_text()) == json.loads((local / "report.json").read_text())


def bare_path_env(cluster) -> dict:
    """The environment of a user who never activated the Python environment: PATH without its scripts."""
    env = cluster.env
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if p != scripts and "pyenv" not in p)
    return env


def status(cluster, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neoxko", "data", "status", str(out)], capture_output=True,
                          text=True, env=cluster.env, timeout=60)


@pytest.mark.slurm
def test_slurm_runs_seven_dependent_jobs_a_lost_stage_fails_by_name_and_the_rerun_resumes_to_the_local_shards(
        cluster, corpus, tokenizer, finished, tmp_path):
    out = tmp_path / "out"
    args = prepare_args(corpus, tokenizer, out, "--executor", "slurm", "--slurm-partition", "debug")
    env = bare_path_env(cluster)  # the jobs must not need the environment's scripts on PATH
    waiting = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    record = out / "slurm_jobs.json"
    deadline = time.monotonic() + 120
    while not record.exists() and waiting.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs = {j["stage"]: j["job"] for j in json.loads(record.read_text())}
    assert list(jobs) == ["clean", "exact-sigs", "exact-find", "minhash-sigs", "minhash-bkts", "minhash-clst",
                          "tokenize"] and all(jobs.values())
    script = (out / "logs" / "1-clean" / "launch_script.slurm").read_text()
    assert f"{sys.executable} -m datatrove.tools.launch_pickled_pipeline" in script
    cluster.run("scancel", jobs["exact-sigs"])  # a stage lost (cancelled, its node gone)
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 2 and "stage exact-sigs failed (Slurm job" in err, err[-3000:]
    assert "cancelled the 5 stage(s) after it" in err and "Traceback" not in err
    queue = cluster.run("squeue", "--noheader", "--format", "%i").stdout.split()
    later = [jobs[s] for s in list(jobs)[2:]]
    assert not [j for j in queue if j.split("_")[0] in later]  # the stages after it are cancelled
    failed = status(cluster, out)
    assert failed.returncode == 2 and "stage exact-sigs failed" in failed.stderr
    while [j for j in cluster.run("squeue", "--noheader", "--format", "%i").stdout.split()
           if j.split("_")[0] in jobs.values()]:  # a rerun while the clean stage still runs is refused
        time.sleep(0.5)
    # the same command resumes (here without waiting; `neoxko data status` follows it to the report)
    again = subprocess.run(args + ["--no-wait"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "neoxko data status" in again.stdout, again.stderr[-2000:]
    deadline = time.monotonic() + 300
    while (done := status(cluster, out)).returncode == 1 and time.monotonic() < deadline:  # 1: still running
        time.sleep(1)
    assert done.returncode == 0 and "| tokenize |" in done.stdout and "| output | tokens |" in done.stdout, \
        done.stdout + done.stderr
    same_as_local(out, finished)


@pytest.mark.slurm
def test_slurm_bad_partition_is_named(cluster, corpus, tokenizer, tmp_path):
    args = prepare_args(corpus, tokenizer, tmp_path / "out", "--executor", "slurm", "--slurm-partition", "gpu")
    done = subprocess.run(args, capture_output=True, text=True, env=cluster.env, timeout=120)
    assert done.returncode == 2
    assert "Slurm has no partition 'gpu' (it has: debug); pass one of those with --slurm-partition" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_ray_runs_the_stages_on_a_local_ray_cluster_to_the_local_shards(corpus, tokenizer, finished, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'neoxko[ray]'")
    out = tmp_path / "out"
    done = subprocess.run(prepare_args(corpus, tokenizer, out, "--executor", "ray"), capture_output=True, text=True,
                          timeout=400, env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    same_as_local(out, finished)


def test_ray_unreachable_address_is_named(corpus, tokenizer, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'neoxko[ray]'")
    port = local_slurm.free_ports(1)[0]
    args = prepare_args(corpus, tokenizer, tmp_path / "out", "--executor", "ray", "--ray-address",
                        f"127.0.0.1:{port}")
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}; start one with `ray start --head`" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_wait_is_for_slurm_only(corpus, tokenizer, tmp_path):
    from neoxko.data.prepare import prepare
    from neoxko.errors import NeoxkoError

    with pytest.raises(NeoxkoError, match=r"--no-wait is for --executor slurm"):
        prepare(pipeline.config(corpus, tokenizer, tmp_path / "out", wait=False))
    assert not (tmp_path / "out").exists()
