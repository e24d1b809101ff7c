"""Time every stage of `neoxko data prepare` on a corpus, and project the card's 1.2 TB job onto a Slurm array.

    python benchmarks/pipeline_scale.py                  # the shared corpus (63 MB), 4 tasks: ~5 min on 2 cores
    python benchmarks/pipeline_scale.py --fraction 0.25  # the first quarter of every file, for a quick look

The input. The corpus is dealt into one shard per task, lines copied byte for byte: task 0 gets every
document over 10 kB (statutes, rulings, long petitions), tasks 1.. the short ones in sizes 1 : 2 : 3, each
with the same mix of sources. The short tasks then differ in their number of documents only, so what a
task accumulates per document can be fitted over them; the long task shows what one long document costs.

What is measured. The stages are prepare.py's own executors (build_executors), pickled, and every task of
every stage runs in a process of its own, pinned to one core with one thread, as a Slurm array task with
--cpus-per-task 1 runs it (datatrove's Slurm executor also unpickles the executor in each task):
  - core-seconds: the task's CPU seconds (user + system, threads and children included) around datatrove's
    run of that rank; the imports are left out. Wall seconds are printed beside them: far more wall than
    CPU means other processes shared the core (the load average is printed), or the stage waited on the disk.
  - peak memory: VmHWM of the task process (/proc/self/status at its end: the peak RSS since exec, imports
    included; not wait4's ru_maxrss, which Linux carries over from the parent through fork and exec). The
    interpreter with datatrove and neoxko's steps loaded (VmRSS before the run) is the floor of every task.
  - MB/s per core: the raw corpus bytes over the stage's core-seconds, whatever the stage itself reads,
    so that every stage projects from the same input size.

What is projected (linear in bytes, from one run on a small corpus: a plan to start from, not a promise):
  - core-hours per stage = core-seconds x (card bytes / measured bytes). The merges (exact-find,
    minhash-bkts) are n log k, a little worse than linear.
  - memory per task of the parallel stages = a one-document term + bytes per document x the task's
    documents. Bytes per document is the slope of peak RSS over the short tasks (exact-sigs keeps every
    hash of its task in a Python list, minhash-sigs sorts each bucket file of its task in memory), unless
    the largest task's RSS levelled off early (tokenize rises over its first ~100k documents, then holds):
    then it is the RSS slope over the last third of that task (RSS is sampled every 50 ms). The
    one-document term is the largest peak less its documents' share (MinHash of the longest document, a
    tokenizer batch of 10,000 long documents): it depends on the longest documents, not on the task's size.
  - exact-find and minhash-bkts stream a heap merge over one signature file per task: their memory
    follows the number of tasks, not the bytes, and is taken as measured.
  - minhash-clst is one process holding a union-find entry for every document in a near-duplicate cluster:
    bytes per entry (measured here with tracemalloc) x such documents at scale, at this corpus's
    near-duplicate share and at an assumed web-crawl share.
"""

import argparse
import json
import math
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

MB = 1e6
CARD_BYTES = 1.2e12  # the card: "about 1.2TB Korean dataset" (decimal terabytes; before or after its filtering unsaid)
LONG_DOCUMENT = 10_000  # bytes: documents over it go to task 0
PARALLEL = ("clean", "exact-sigs", "minhash-sigs", "tokenize")  # the stages that run --tasks tasks


@dataclass
class Task:
    stage: str
    rank: int
    input_bytes: float  # raw corpus bytes behind this task (an even share for the merge stages)
    documents: float  # documents read by this rank in stage 1 (an even share for the merge stages)
    cpu_s: float
    wall_s: float
    floor_mb: float  # RSS after imports, before the run
    peak_mb: float  # peak RSS of the whole process (VmHWM)
    levelled_at: float  # share of the run after which RSS stayed within 5% of its peak
    late_mb_per_s: float  # RSS growth over the last third of the run


# 1. The input: one shard per task ----------------------------------------------------------------------


def length_shards(source: Path, fraction: float, tasks: int, dest: Path) -> list[str]:
    """Documents over LONG_DOCUMENT bytes into shard 0, the others dealt into shards 1.. sized 1 : 2 : 3 ..."""
    from neoxko.data.prepare import input_files

    root, names = input_files([str(source)])
    pattern = [rank for rank in range(1, tasks) for _ in range(rank)]  # 1, 2, 2, 3, 3, 3, ...
    shards: dict[str, list] = {}
    dealt = 0
    for name in names:
        kind = next((k for k in (".jsonl", ".txt") if name.endswith(k)), None)
        if kind is None:
            raise SystemExit(f"{name}: this benchmark reads .txt and .jsonl files only")
        if kind not in shards:  # names sort so that datatrove's files[rank::tasks] are shard `rank` of each kind
            shards[kind] = [(dest / f"{len(shards)}-{rank:03d}{kind}").open("wb") for rank in range(tasks)]
        lines = [line for line in (root / name).read_bytes().splitlines(keepends=True) if line.strip()]
        for line in lines[: max(1, round(len(lines) * fraction))]:
            line = line if line.endswith(b"\n") else line + b"\n"
            if len(line) > LONG_DOCUMENT:
                shards[kind][0].write(line)
            else:
                shards[kind][pattern[dealt % len(pattern)]].write(line)
                dealt += 1
    for files in shards.values():
        for f in files:
            f.close()
    return [str(dest)]


# 2. One task in its own process ------------------------------------------------------------------------


def run_task(executor_file: str, rank: int, core: int, result_file: str) -> None:
    """Child: load the pickled executor, run one rank of it, write CPU and wall seconds, floor and peak RSS,
    and the shape of its RSS over time (when it levelled off, how fast it grew in the last third)."""
    os.sched_setaffinity(0, {core})
    with open(executor_file, "rb") as f:
        executor = pickle.load(f)  # imports datatrove, neoxko's steps and what they load
    floor = _status_mb("VmRSS")
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(samples, stop), daemon=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    sampler.start()
    executor._run_for_rank(rank)  # what LocalPipelineExecutor and SlurmPipelineExecutor call per task
    end, cpu = time.perf_counter(), _cpu_seconds() - cpu
    stop.set()
    sampler.join()
    peak = _status_mb("VmHWM")
    result = {"cpu_s": cpu, "wall_s": end - start, "floor_mb": floor, "peak_mb": peak}
    Path(result_file).write_text(json.dumps(result | _rss_shape(samples, start, end, floor, peak)))


def _sample_rss(samples: list, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        samples.append((time.perf_counter(), _status_mb("VmRSS")))


def _rss_shape(samples: list, start: float, end: float, floor: float, peak: float) -> dict:
    """levelled_at: the share of the run after which RSS stayed within 5% of its rise; late_mb_per_s: its slope
    over the last third of the run (what the task still accumulates once any warm-up is over)."""
    if len(samples) < 10:
        return {"levelled_at": 1.0, "late_mb_per_s": 0.0}
    reached = next(t for t, rss in samples + [(end, peak)] if rss >= floor + 0.95 * (peak - floor))
    late = [(t, rss) for t, rss in samples if t >= start + 2 / 3 * (end - start)]
    slope, _ = _line([t for t, _ in late], [rss for _, rss in late]) if len(late) > 1 else (0.0, 0.0)
    return {"levelled_at": (reached - start) / (end - start), "late_mb_per_s": slope}


def _cpu_seconds() -> float:
    """User and system seconds of this process and of any it waited for."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def _status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_stage(executor, name: str, work: Path, cores: list[int]) -> list[dict]:
    """Every rank of one stage, as many at once as there are cores; per rank: seconds, floor and peak RSS."""
    bench = work / "bench"
    bench.mkdir(exist_ok=True)
    executor.depends = None  # the stage before has finished; the child must not look for it
    (bench / f"{name}.pkl").write_bytes(pickle.dumps(executor))
    env = os.environ | {"OMP_NUM_THREADS": "1", "RAYON_RS_NUM_CPUS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running, results, free = list(range(executor.world_size)), {}, [{}] * executor.world_size, list(cores)
    while pending or running:
        while pending and free:
            rank, core = pending.pop(0), free.pop(0)
            log = (bench / f"{name}-{rank}.log").open("w")
            proc = subprocess.Popen([sys.executable, __file__, "--task", str(bench / f"{name}.pkl"), str(rank),
                                     str(core), str(bench / f"{name}-{rank}.json")],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running[proc.pid] = (proc, rank, core, log)
        pid, status = os.waitpid(-1, 0)
        proc, rank, core, log = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        log.close()
        free.append(core)
        if proc.returncode:
            raise SystemExit(f"{name} task {rank} failed (exit {proc.returncode}); see {log.name}")
        results[rank] = json.loads((bench / f"{name}-{rank}.json").read_text())
    return results


# 3. The pipeline, stage by stage -----------------------------------------------------------------------


def measure(inputs: list[str], tokenizer: str, tasks: int, work: Path, cores: list[int]) -> tuple[list[Task], dict]:
    from neoxko.data.prepare import STAGES, PrepareConfig, build_executors, claim_output, tokenizer_file

    config = PrepareConfig(inputs=inputs, output=str(work), tokenizer=tokenizer, tasks=tasks)
    claim_output(config)
    executors = build_executors(config, tokenizer_file(tokenizer))
    measured = []
    for n, (name, executor) in enumerate(zip(STAGES, executors, strict=True)):
        start = time.perf_counter()
        results = run_stage(executor, name, work, cores)
        print(f"  {n + 1}/{len(STAGES)} {name:<13} {len(results):>3} task(s) in {time.perf_counter() - start:6.1f} s",
              file=sys.stderr, flush=True)
        if n == 0:
            stats = [work / "logs" / f"1-{name}" / "stats" / f"{r:05d}.json" for r in range(tasks)]
            rank_bytes = [_step_stat(f, "READER", "bytes_read") for f in stats]
            rank_docs = [_step_stat(f, "READER", "documents") for f in stats]
        for rank, r in enumerate(results):
            mine = len(results) == tasks
            measured.append(Task(name, rank, rank_bytes[rank] if mine else sum(rank_bytes) / len(results),
                                 rank_docs[rank] if mine else sum(rank_docs) / len(results),
                                 r["cpu_s"], r["wall_s"], r["floor_mb"], r["peak_mb"], r["levelled_at"],
                                 r["late_mb_per_s"]))
    counts = {
        "bytes": sum(rank_bytes),
        "documents": sum(rank_docs),
        "tokens": _stage_stat(work, "7-tokenize", "TOKENIZER", "tokens"),
        "clustered": _stage_stat(work, "6-minhash-clst", "MinHash stage 3", "duplicates"),
        "disk": {d: sum(f.stat().st_size for f in (work / d).rglob("*") if f.is_file())
                 for d in ("clean", "exact", "minhash", "documents", "tokens")},
    }
    return measured, counts


def _step_stat(stats_file: Path, step: str, key: str) -> float:
    """One counter of one step in a task's datatrove stats file (0 when absent)."""
    for entry in json.loads(stats_file.read_text(encoding="utf-8")):
        if step in entry["name"]:
            value = entry.get("stats", {}).get(key, 0)
            return value.get("total", 0) if isinstance(value, dict) else value
    return 0


def _stage_stat(work: Path, stage: str, step: str, key: str) -> float:
    return sum(_step_stat(f, step, key) for f in sorted((work / "logs" / stage / "stats").glob("*.json")))


def union_find_entry_bytes(n: int = 200_000) -> float:
    """Bytes per document in datatrove's MinhashDedupCluster union-find: a (file, doc) tuple key, a parent value."""
    tracemalloc.start()
    union_set, set_size = {}, {}
    for i in range(n):
        node = (i % 997, 10_000_000 + i)  # fresh ints above CPython's small-int cache, as doc ids are
        root = node if i % 2 == 0 else union_set[(i - 1) % 997, 10_000_000 + i - 1]
        union_set[node] = root
        set_size[root] = set_size.get(root, 1) + 1
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return size / n


# 4. Summary and projection -----------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    tasks: int
    cpu_s: float
    wall_s: float
    floor_mb: float
    peak_mb: float
    per_document: float = 0.0  # bytes of RSS per document of the task (parallel stages)
    levels_off: bool = False  # the largest task's RSS levelled off before its end: per_document is its late slope
    one_document_mb: float = 0.0  # RSS with no documents accumulated: floor + the longest document or batch

    def task_memory_gb(self, documents: float) -> float:
        return (self.one_document_mb * MB + self.per_document * documents) / 1e9


def summarize(tasks: list[Task]) -> list[Stage]:
    stages = []
    for name in dict.fromkeys(t.stage for t in tasks):
        mine = [t for t in tasks if t.stage == name]
        stage = Stage(name, len(mine), sum(t.cpu_s for t in mine), sum(t.wall_s for t in mine),
                      max(t.floor_mb for t in mine), max(t.peak_mb for t in mine))
        if name in PARALLEL:
            stage.per_document, stage.levels_off = _per_document(mine[1:])
            stage.one_document_mb = max(max(t.peak_mb - stage.per_document * t.documents / MB for t in mine),
                                        stage.floor_mb)
        stages.append(stage)
    return stages


def _per_document(short: list[Task]) -> tuple[float, bool]:
    """Bytes of RSS per document of a task, and whether the largest task's RSS levelled off.

    RSS that rises to its peak by the end of the largest task (a list of hashes, a sort at the end) grows with
    the task: the slope of peak RSS over the short tasks. RSS that levelled off in the first three quarters
    (tokenize: it rises over the first ~100k documents, then holds) makes that slope a warm-up, so the slope
    over the last third of the largest task is used instead.
    """
    largest = max(short, key=lambda t: t.documents)
    if largest.levelled_at < 0.75:
        return max(largest.late_mb_per_s, 0.0) * MB * largest.wall_s / largest.documents, True
    return _line([t.documents for t in short], [t.peak_mb * MB for t in short])[0], False


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope (not below 0: no stage frees memory as its task grows) and intercept."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    slope = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread, 0.0) if spread else 0.0
    return slope, my - slope * mx


@dataclass
class Plan:
    tasks: int
    mem_per_cpu_gb: int
    time_h: int
    rows: list[tuple[str, int, float, float, float]]  # stage, tasks, core-hours, hours per task, GB per task
    clst_gb: tuple[float, float]  # minhash-clst memory at the measured and at the assumed crawl share


def project(stages: list[Stage], counts: dict, args: argparse.Namespace, entry_bytes: float) -> Plan:
    scale = args.target_bytes / counts["bytes"]
    documents = counts["documents"] * scale
    core_h = {s.name: s.cpu_s * scale / 3600 for s in stages}
    parallel = [s for s in stages if s.name in PARALLEL]
    # tasks: the slowest parallel stage in tasks of about --task-hours; more when a task would need more than
    # --max-mem-per-cpu-gb (with a quarter to spare)
    n = math.ceil(max(core_h[s.name] for s in parallel) / args.task_hours / 10) * 10
    floor = max(parallel, key=lambda s: s.one_document_mb)
    if 1.25 * floor.one_document_mb / 1e3 >= args.max_mem_per_cpu_gb:
        raise SystemExit(f"{floor.name} needs {floor.one_document_mb:.0f} MB for its longest document or batch alone, "
                         f"with a quarter to spare over --max-mem-per-cpu-gb {args.max_mem_per_cpu_gb}: raise it")
    while 1.25 * max(s.task_memory_gb(documents / n) for s in parallel) > args.max_mem_per_cpu_gb:
        n = math.ceil(n * 1.05 / 10) * 10
    clst = next(s for s in stages if s.name == "minhash-clst")
    clst_gb = tuple((clst.floor_mb * MB + entry_bytes * docs) / 1e9
                    for docs in (counts["clustered"] * scale, args.crawl_dup_share * documents))
    rows = []
    for s in stages:
        count = n if s.name in PARALLEL else s.tasks
        gb = s.task_memory_gb(documents / n) if s.name in PARALLEL else clst_gb[0] if s is clst else s.peak_mb / 1e3
        rows.append((s.name, count, core_h[s.name], core_h[s.name] / count, gb))
    time_h = max(1, math.ceil(2 * max(r[3] for r in rows)))  # twice the mean task: whole files make tasks unequal
    mem = max(2, math.ceil(1.25 * max(r[4] for r in rows if r[0] in PARALLEL)))
    return Plan(n, mem, time_h, rows, clst_gb)


# 5. Printing -------------------------------------------------------------------------------------------


def print_environment(args: argparse.Namespace, cores: list[int]) -> None:
    from importlib.metadata import version

    import torch

    from neoxko.hardware import detect

    hw = detect()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"machine      {cpu}; torch CPU capability {hw.capability}, native bf16 {'yes' if hw.native_bf16 else 'no'}, "
          f"VNNI {'yes' if hw.vnni else 'no'}, {hw.cores} logical cores ({len(cores)} used, one task per core)")
    print(f"versions     python {sys.version.split()[0]}, torch {torch.__version__}, datatrove {version('datatrove')}")
    share = f"the first {args.fraction:.0%} of " if args.fraction < 1 else ""
    print(f"run          neoxko data prepare SHARDS --tokenizer {args.tokenizer} --tasks {args.tasks}; SHARDS: {share}"
          f"{args.input}, documents over {LONG_DOCUMENT:,} bytes in task 0, the others in 1:...:{args.tasks - 1}")


def print_measured(stages: list[Stage], counts: dict, tasks: list[Task]) -> None:
    total = counts["bytes"]
    print(f"\nMeasured: {total / MB:.1f} MB, {counts['documents']:,.0f} documents; every task pinned to one core")
    print("| stage | tasks | core-s (CPU) | wall s | MB/s per core | peak RSS per task (MB) | floor (MB) "
          "| RSS per document (B) | RSS, one document (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in stages:
        how = " (levels off)" if s.levels_off else ""
        fit = f"{s.per_document:.0f}{how} | {s.one_document_mb:.0f}" if s.name in PARALLEL else "merge | merge"
        print(f"| {s.name} | {s.tasks} | {s.cpu_s:.1f} | {s.wall_s:.1f} | {total / MB / s.cpu_s:.2f} "
              f"| {s.peak_mb:.0f} | {s.floor_mb:.0f} | {fit} |")
    cpu = sum(s.cpu_s for s in stages)
    print(f"| all | | {cpu:.1f} | {sum(s.wall_s for s in stages):.1f} | {total / MB / cpu:.2f} | | | | |")
    first = [t for t in tasks if t.stage == "clean"]
    print("tasks (MB / documents): " + ", ".join(f"{t.input_bytes / MB:.1f} / {t.documents:,.0f}" for t in first))
    for s in stages:
        if s.name in PARALLEL:
            print(f"  peak RSS (MB) {s.name:<13} " + ", ".join(
                f"{t.peak_mb:.0f} ({t.levelled_at:.0%})" for t in tasks if t.stage == s.name))
    print("  (in brackets: the share of the task's run after which its RSS stayed within 5% of its peak)")


def print_projection(plan: Plan, counts: dict, args: argparse.Namespace, entry_bytes: float) -> None:
    scale = args.target_bytes / counts["bytes"]
    print(f"\nProjected to the card's {args.target_bytes / 1e12:.1f} TB (x{scale:,.0f}; "
          f"~{counts['documents'] * scale / 1e9:.1f}B documents at this corpus's "
          f"{counts['bytes'] / counts['documents']:.0f} bytes per document):")
    print("| stage | core-hours | tasks | hours per task | memory per task (GB) |")
    print("|---|---:|---:|---:|---:|")
    for name, count, core_h, hours, gb in plan.rows:
        print(f"| {name} | {core_h:,.1f} | {count:,} | {hours:.2f} | {gb:.2f} |")
    print(f"| all | {sum(r[2] for r in plan.rows):,.0f} | | {sum(r[3] for r in plan.rows):.1f} "
          "(critical path: every task of a stage at once) | |")
    disk = ", ".join(f"{d}/ {b * scale / 1e12:.2f}" for d, b in counts["disk"].items())
    print(f"disk (TB): {disk}; {sum(counts['disk'].values()) * scale / 1e12:.1f} in all; "
          f"{counts['tokens'] * scale / 1e9:,.0f}B tokens ({args.tokenizer})")
    print(f"minhash-clst: {entry_bytes:.0f} bytes per document in a near-duplicate cluster (union-find, measured); "
          f"{plan.clst_gb[0]:.1f} GB at this corpus's {counts['clustered'] / counts['documents']:.2%} of documents "
          f"in clusters, {plan.clst_gb[1]:.0f} GB if {args.crawl_dup_share:.0%} are (a web crawl; assumed)")
    workers = min(plan.tasks, args.concurrent)
    print("\nSlurm (one array per stage, each depending on the one before; datatrove SlurmPipelineExecutor):")
    print(f"  parallel stages: tasks={plan.tasks}, cpus_per_task=1, mem_per_cpu_gb={plan.mem_per_cpu_gb}, "
          f"time=\"{plan.time_h:02d}:00:00\", workers={workers} (tasks at once)")
    print(f"  = sbatch --array=0-{min(plan.tasks, 1001) - 1}%{workers} --cpus-per-task=1 "
          f"--mem-per-cpu={plan.mem_per_cpu_gb}G --time={plan.time_h:02d}:00:00 --partition=PART "
          "(datatrove splits arrays over 1,001)")
    print(f"  minhash-clst: tasks=1, mem_per_cpu_gb={max(2, math.ceil(1.25 * plan.clst_gb[0]))} at this corpus's "
          "share of near duplicates")
    print(f"  neoxko data prepare SHARDS/ --tokenizer TOKENIZER --executor slurm --slurm-partition PART "
          f"--slurm-time {plan.time_h:02d}:00:00 --tasks {plan.tasks} --workers {workers}")
    print(f"  SHARDS/: at least {plan.tasks} files of similar size (~{args.target_bytes / plan.tasks / 1e9:.1f} GB): "
          "datatrove gives each task whole files")


# 6. Main -----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="/work/shared/corpus", help="corpus folder or file (default: the shared corpus)")
    p.add_argument("--tokenizer", default="ko-small", help="tokenizer for the tokenize stage (default: built-in)")
    p.add_argument("--tasks", type=int, default=4, help="tasks of the parallel stages: one long, the rest short")
    p.add_argument("--fraction", type=float, default=1.0, help="share of every input file to use (default: all)")
    p.add_argument("--cores", type=int, default=None, help="tasks at once, one per core (default: every core)")
    p.add_argument("--target-bytes", type=float, default=CARD_BYTES, help="bytes to project to (default: 1.2e12)")
    p.add_argument("--task-hours", type=float, default=1.0, help="aim for tasks of about this long at scale")
    p.add_argument("--max-mem-per-cpu-gb", type=int, default=4, help="memory per core a cluster node has")
    p.add_argument("--concurrent", type=int, default=1000, help="cluster cores to plan for (the array's %%N)")
    p.add_argument("--crawl-dup-share", type=float, default=0.3,
                   help="assumed share of documents in near-duplicate clusters at scale, for minhash-clst memory")
    p.add_argument("--keep", default=None, help="keep the run folder here (default: a temporary folder)")
    p.add_argument("--task", nargs=4, default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if not args.task and args.tasks < 3:
        p.error("--tasks must be at least 3: one long task and two short ones to fit memory per document")
    return args


def main() -> None:
    args = parse_args()
    if args.task:
        run_task(args.task[0], int(args.task[1]), int(args.task[2]), args.task[3])
        return
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    with tempfile.TemporaryDirectory(prefix="pipeline_scale-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp) / "run"
        shards = Path(tmp) / "shards"
        shards.mkdir()
        inputs = length_shards(Path(args.input), args.fraction, args.tasks, shards)
        print_environment(args, cores)
        start, load = time.perf_counter(), os.getloadavg()[0]
        tasks, counts = measure(inputs, args.tokenizer, args.tasks, work, cores)
        after = os.getloadavg()[0]
        busy = " (more than the cores used: other processes shared them)" if max(load, after) > len(cores) + 0.5 else ""
        print(f"elapsed      {time.perf_counter() - start:.0f} s for the seven stages; load average {load:.1f} before, "
              f"{after:.1f} after{busy}")
        stages = summarize(tasks)
        entry_bytes = union_find_entry_bytes()
        print_measured(stages, counts, tasks)
        print_projection(project(stages, counts, args, entry_bytes), counts, args, entry_bytes)


if __name__ == "__main__":
    main()
