"""Where `neoxko data prepare`'s stages run: on this machine, as dependent Slurm array jobs, or on a Ray cluster.

Every executor runs the same datatrove pipelines with the same task count, so each writes the same shards.
A stage's finished tasks are files in its logs/N-stage/completions/ (datatrove's own record), which is how
a rerun skips them and how `neoxko data status` counts them.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from neoxko.errors import NeoxkoError

JOBS_FILE = "slurm_jobs.json"
QUEUE_ENDED_REASONS = ("DependencyNeverSatisfied",)


def make_executor(config, pipeline: list, tasks: int, logs: Path, depends, name: str):
    """One stage's datatrove executor for config.executor (local, slurm or ray)."""
    if config.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(config.workers, tasks),
                                     logging_dir=str(logs), depends=depends)
    if config.executor == "slurm":
        return slurm_executor()(pipeline, tasks=tasks, time=config.slurm_time, partition=config.slurm_partition,
                                logging_dir=str(logs), depends=depends, job_name=f"neoxko-{name}",
                                # tasks at once: --workers when given, else as many as Slurm will run
                                workers=config.workers if config.workers > 1 else -1,
                                mem_per_cpu_gb=config.slurm_mem_per_cpu_gb,
                                qos=None, mail_type="NONE")
    if config.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=config.workers, logging_dir=str(logs),
                                   depends=depends, mem_per_cpu_gb=1)
    raise NeoxkoError(f"unknown executor {config.executor!r}; use local, slurm or ray")


def slurm_executor():
    """datatrove's Slurm executor, with its jobs run by the submitting Python (`sys.executable -m ...`, not
    whatever `launch_pickled_pipeline` the job's PATH finds) and without merge-stats jobs (the report reads
    each task's stats)."""
    from datatrove.executor import SlurmPipelineExecutor

    class NeoxkoSlurmExecutor(SlurmPipelineExecutor):
        def get_launch_file_contents(self, sbatch_args: dict, run_script: str) -> str:
            python = shlex.quote(sys.executable)
            run_script = run_script.replace("launch_pickled_pipeline ",
                                            f"{python} -m datatrove.tools.launch_pickled_pipeline ")
            return super().get_launch_file_contents(sbatch_args, run_script)

        def launch_merge_stats(self) -> None:
            pass

    NeoxkoSlurmExecutor.__module__ = __name__  # dill pickles the class by reference to this module
    return NeoxkoSlurmExecutor


# -- Slurm: checks before submitting, the jobs' state after ------------------------------------------------------

def check_slurm(partition: str | None) -> None:
    """sbatch is here and the partition exists, with a message that names the fix where not."""
    if not partition:
        raise NeoxkoError("--executor slurm needs --slurm-partition (sinfo lists the partitions)")
    try:
        found = _slurm("sinfo", "--noheader", "--format", "%R")
    except FileNotFoundError:
        raise NeoxkoError("--executor slurm needs Slurm's commands (sbatch, squeue, sinfo) on PATH: run it on a "
                          "Slurm login node, or use --executor local or ray") from None
    partitions = found.split()
    if partition not in partitions:
        raise NeoxkoError(f"Slurm has no partition {partition!r} (it has: {', '.join(partitions) or 'none'}); "
                          "pass one of those with --slurm-partition")


def _slurm(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    except subprocess.CalledProcessError as e:
        first = ((e.stderr or e.stdout).strip().splitlines() or ["no message"])[0][:200]
        raise NeoxkoError(f"{args[0]} failed ({first}); is Slurm reachable from here (`scontrol ping`; SLURM_CONF "
                          "names the cluster's slurm.conf)?") from None
    except subprocess.TimeoutExpired:
        raise NeoxkoError(f"{args[0]} did not answer in 60 s: is slurmctld up? (scontrol ping)") from None


@dataclass
class StageState:
    name: str
    job: str | None  # None: nothing was submitted (every task had finished before)
    tasks: int
    done: int
    queued: dict[str, str]  # array task -> "STATE reason" for those still in the queue
    logs: Path

    @property
    def finished(self) -> bool:
        return self.done >= self.tasks

    @property
    def failed(self) -> bool:
        """Not finished, and nothing of it left to run (its jobs ended or can never start)."""
        return not self.finished and all(any(r in v for r in QUEUE_ENDED_REASONS) for v in self.queued.values())


def record_jobs(out: Path, stages: list[str], executors: list) -> None:
    jobs = [{"stage": name, "job": None if e.job_id in (None, -1) else str(e.job_id), "tasks": e.tasks,
             "logs": str(e.logging_dir.path)} for name, e in zip(stages, executors, strict=True)]
    (out / JOBS_FILE).write_text(json.dumps(jobs, indent=1) + "\n", encoding="utf-8")


def slurm_states(out: Path) -> list[StageState]:
    record = out / JOBS_FILE
    if not record.is_file():
        raise NeoxkoError(f"{out} holds no Slurm run ({JOBS_FILE} is missing); start one with "
                          "neoxko data prepare ... --executor slurm")
    jobs = json.loads(record.read_text(encoding="utf-8"))
    queue = _queue({j["job"] for j in jobs if j["job"]})
    states = []
    for j in jobs:
        logs = Path(j["logs"])
        done = len(list((logs / "completions").glob("*"))) if (logs / "completions").is_dir() else 0
        queued = {k: v for k, v in queue.items() if k.split("_")[0] == j["job"]}
        states.append(StageState(j["stage"], j["job"], j["tasks"], done, queued, logs))
    return states


def _queue(jobs: set[str]) -> dict[str, str]:
    """{array task id: "STATE reason"} of this run's jobs still in Slurm's queue."""
    if not jobs:
        return {}
    lines = _slurm("squeue", "--noheader", "--array", "--format", "%i %T %r").splitlines()
    return {f[0]: " ".join(f[1:]) for f in map(str.split, lines) if f and f[0].split("_")[0] in jobs}


def clear_previous(out: Path) -> None:
    """Before a rerun submits again: jobs of the previous submission that can never start (their dependency
    failed) are cancelled; jobs still queued or running are not doubled: refused."""
    if not (out / JOBS_FILE).is_file():
        return
    states = slurm_states(out)
    stale = [s.job for s in states if s.queued and s.failed]
    active = [s for s in states if s.queued and not s.failed]
    if active:
        raise NeoxkoError(f"the jobs of the previous submission to {out} are still queued or running (stage "
                          f"{active[0].name}, job {active[0].job}); follow them with `neoxko data status {out}`, or "
                          "scancel them, before running the command again")
    if stale:
        _slurm("scancel", *stale)


def raise_failed(states: list[StageState]) -> None:
    """If a stage failed: cancel the queued stages after it (they wait on a dependency that can never be met)
    and raise with the stage's name and its log's last lines."""
    failed = next((s for s in states if s.failed), None)
    if failed is None:
        return
    later = [s.job for s in states[states.index(failed) + 1:] if s.job and s.queued]
    if later:
        _slurm("scancel", *later)
    raise NeoxkoError(f"stage {failed.name} failed (Slurm job {failed.job}: {failed.done}/{failed.tasks} tasks "
                      f"finished); cancelled the {len(later)} stage(s) after it. Fix the cause and run the same "
                      f"prepare command again to resume. {last_lines(failed.logs)}")


def status_table(states: list[StageState]) -> str:
    rows = ["| stage | job | tasks done | in the queue |", "|---|---|---:|---|"]
    for s in states:
        queued = ", ".join(sorted(set(s.queued.values()))) or ("-" if s.finished else "none (ended)")
        rows.append(f"| {s.name} | {s.job or '-'} | {s.done}/{s.tasks} | {queued} |")
    return "\n".join(rows)


def wait_slurm(out: Path, poll_s: float = 2.0) -> None:
    """Wait for every stage; a failed stage cancels the stages after it and raises with its log's last lines."""
    from tqdm import tqdm

    states = slurm_states(out)
    with tqdm(total=sum(s.tasks for s in states), desc="slurm tasks", unit="task") as bar:
        while True:
            states = slurm_states(out)
            bar.update(sum(min(s.done, s.tasks) for s in states) - bar.n)
            raise_failed(states)
            if all(s.finished for s in states):
                return
            time.sleep(poll_s)


def last_lines(logs: Path, n: int = 12) -> str:
    """The last lines of a stage's newest Slurm log (or datatrove task log)."""
    files = [f for f in list((logs / "slurm_logs").glob("*.out")) + list((logs / "logs").glob("*.log"))
             if f.stat().st_size]
    if not files:
        return f"No log was written under {logs}."
    newest = max(files, key=lambda f: f.stat().st_mtime)
    tail = newest.read_text(errors="replace").splitlines()[-n:]
    return f"Last lines of {newest}:\n" + "\n".join("    " + line for line in tail)


# -- Ray ---------------------------------------------------------------------------------------------------------

def connect_ray(address: str | None, cpus: int) -> None:
    """Join the Ray cluster at address (host:port of `ray start --head`), or start one in this process."""
    try:
        import ray
    except ImportError:
        raise NeoxkoError("--executor ray needs Ray: pip install 'neoxko[ray]'") from None
    if ray.is_initialized():
        return
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError):
            raise NeoxkoError(f"cannot reach a Ray cluster at {address}; start one with `ray start --head` and pass "
                              "the address it prints (host:6379), or leave --ray-address out to run Ray on this "
                              "machine") from None
    try:
        ray.init(address=address, num_cpus=None if address else cpus, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        token = Path.home() / ".ray" / "auth_token"
        hint = (" It may ask for a token: `ray start` turns token authentication on in Ray 2.52 and newer; run "
                f"with RAY_AUTH_MODE=token (the token is {token})." if token.exists() and
                os.environ.get("RAY_AUTH_MODE") != "token" else "")
        raise NeoxkoError(f"cannot join the Ray cluster at {address or 'this machine'} ({_first_line(e)}); check "
                          f"`ray status` there, or leave --ray-address out to run Ray on this machine.{hint}") from None


def _first_line(e: Exception) -> str:
    return re.sub(r"\s+", " ", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:200]
