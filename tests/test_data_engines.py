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

# the local executor's run on the same corpus (test_data_pipeline's fixtures)
corpus, tokenizer, finished = pipeline.corpus, pipeline.tokenizer, pipeline.finished


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        cluster = local_slurm.start(tmp_path_factory.mktemp("slurm"))
    except local_slurm.Unavailable as e:
        pytest.skip(str(e))
    yield cluster
    cluster.stop()


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


@pytest.mark.slurm
def test_slurm_runs_seven_dependent_jobs_in_the_submitting_python_to_the_local_shards(cluster, corpus, tokenizer,
                                                                                   finished, tmp_path):
    out = tmp_path / "out"
    args = prepare_args(corpus, tokenizer, out, "--executor", "slurm", "--slurm-partition", "debug")
    done = subprocess.run(args, capture_output=True, text=True, env=bare_path_env(cluster), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = json.loads((out / "slurm_jobs.json").read_text())
    assert [j["stage"] for j in jobs] == ["clean", "exact-sigs", "exact-find", "minhash-sigs", "minhash-bkts",
                                         "minhash-clst", "tokenize"] and all(j["job"] for j in jobs)
    script = (out / "logs" / "1-clean" / "launch_script.slurm").read_text()
    assert f"{sys.executable} -m datatrove.tools.launch_pickled_pipeline" in script
    same_as_local(out, finished)
    status = subprocess.run([sys.executable, "-m", "neoxko", "data", "status", str(out)], capture_output=True,
                            text=True, env=cluster.env, timeout=60)
    assert status.returncode == 0 and "| tokenize |" in status.stdout and "| output | tokens |" in status.stdout


@pytest.mark.slurm
def test_slurm_stage_killed_fails_by_name_cancels_the_rest_and_the_rerun_resumes(cluster, corpus, tokenizer,
                                                                               finished, tmp_path):
    out = tmp_path / "out"
    args = prepare_args(corpus, tokenizer, out, "--executor", "slurm", "--slurm-partition", "debug")
    submitted = subprocess.run(args + ["--no-wait"], capture_output=True, text=True, env=cluster.env, timeout=120)
    assert submitted.returncode == 0 and "neoxko data status" in submitted.stdout, submitted.stderr[-2000:]
    jobs = {j["stage"]: j["job"] for j in json.loads((out / "slurm_jobs.json").read_text())}
    cluster.run("scancel", jobs["exact-sigs"])  # a stage lost (preempted, node gone, cancelled)
    waited = subprocess.run([sys.executable, "-m", "neoxko", "data", "status", str(out)], capture_output=True,
                            text=True, env=cluster.env, timeout=60)
    deadline = time.monotonic() + 120
    while waited.returncode == 1 and time.monotonic() < deadline:  # 1: still running
        time.sleep(1)
        waited = subprocess.run([sys.executable, "-m", "neoxko", "data", "status", str(out)], capture_output=True,
                                text=True, env=cluster.env, timeout=60)
    assert waited.returncode == 2 and "stage exact-sigs failed" in waited.stderr, waited.stdout + waited.stderr
    # the command that waits says the same, ends non-zero and cancels the stages that depend on it
    waiting = subprocess.run(args, capture_output=True, text=True, env=cluster.env, timeout=400)
    assert waiting.returncode == 0, waiting.stderr[-3000:]  # the rerun resubmits what was left, and finishes
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
