"""lm-evaluation-harness with --model hf against --model neoxko on the same KoBEST tasks, in one run.

lm-eval's own KoBEST task files (pointed at local data: the shared skt/kobest_v1 copy, else the repo's fixture)
run twice per shot count, once through transformers (`--model hf`) and once through neoxko (`--model neoxko`,
contexts shared across a document's choices), on the same weights: the metrics side by side, the largest
per-document log-likelihood difference, and the wall time of each.

    python benchmarks/harness.py [--model ko-small] [--shots 0,5] [--limit 200] [--shared ../shared]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_tasks import FIXTURE, TASKS, lm_eval_tasks  # noqa: E402
from machine import describe  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ko-small", help="a folder or built-in name (transformers loads it too)")
    parser.add_argument("--shots", default="0,5")
    parser.add_argument("--limit", type=int, default=200, help="test documents per task")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager

    import neoxko.evaluate.harness  # noqa: F401 - registers --model neoxko
    from neoxko.checkpoint import resolve

    folder = resolve(args.model)
    data = args.shared / "kobest" / "kobest_v1"
    data = data if data.is_dir() else FIXTURE
    tasks = lm_eval_tasks(Path(tempfile.mkdtemp()) / "tasks", data)
    manager = TaskManager(include_path=str(tasks))
    names = [f"neoxko_{t}" for t in TASKS]
    print(describe())
    print(f"\nmodel {args.model}, data {data}, up to {args.limit} test documents per task, "
          f"lm-eval {lm_eval.__version__}, batch size {args.batch_size}, float32\n")
    print("| shots | task | metric | --model hf | --model neoxko | max per-document log-likelihood difference |")
    print("|---:|---|---|---:|---:|---:|")
    times = []
    for shots in map(int, args.shots.split(",")):
        runs = {}
        for model in ("hf", "neoxko"):
            start = time.perf_counter()
            runs[model] = lm_eval.simple_evaluate(
                model=model, model_args=f"pretrained={folder},dtype=float32,device=cpu", tasks=names,
                num_fewshot=shots, limit=args.limit, task_manager=manager, log_samples=True,
                batch_size=args.batch_size, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                fewshot_random_seed=1234)
            runs[model]["seconds"] = time.perf_counter() - start
        for name in names:
            a = {s["doc_id"]: s for s in runs["hf"]["samples"][name]}
            b = {s["doc_id"]: s for s in runs["neoxko"]["samples"][name]}
            worst = max(abs(x[0][0] - y[0][0]) for d in a for x, y in zip(a[d]["resps"], b[d]["resps"], strict=True))
            for metric, value in runs["hf"]["results"][name].items():
                if isinstance(value, float) and "stderr" not in metric:
                    print(f"| {shots} | {name.removeprefix('neoxko_')} | {metric.split(',')[0]} | {value:.4f} | "
                          f"{runs['neoxko']['results'][name][metric]:.4f} | {worst:.1e} |")
        times.append((shots, runs["hf"]["seconds"], runs["neoxko"]["seconds"]))
    print("\n| shots | --model hf s | --model neoxko s | speedup |\n|---:|---:|---:|---:|")
    for shots, hf, ours in times:
        print(f"| {shots} | {hf:.1f} | {ours:.1f} | {hf / ours:.1f}x |")


if __name__ == "__main__":
    main()
