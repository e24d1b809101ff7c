"""KoBEST with lm-evaluation-harness (pip install lm-eval) and with neoxko, same model, same documents.

Builds a small random GPT-NeoX with a Korean tokenizer (or takes --model), points lm-eval at the local
data through a task include_path (the kobest tasks with dataset_path json), runs both, checks that
the metrics agree to 1e-6 and every per-document log-likelihood to 1e-4, and prints the wall times.

    python benchmarks/kobest.py --tokenizer TOKENIZER_DIR [--shots 5,50] [--limit 40] [--data-dir DIR]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neoxko.config import ModelConfig
from neoxko.evaluate.kobest import EvalSettings, evaluate
from neoxko.evaluate.scoring import NeoxkoScorer
from neoxko.evaluate.tasks import TASKS
from neoxko.model import GPTNeoX, init_weights

SHARED = Path(__file__).resolve().parents[2] / "shared"


def small_model(folder: Path, tokenizer: Path) -> Path:
    from neoxko.checkpoint import save_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=30080, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         intermediate_size=2048, rotary_pct=0.5)
    model = GPTNeoX(config)
    init_weights(model)
    save_model(model, folder, tokenizer=tokenizer)
    return folder


def lm_eval_tasks(folder: Path, data_dir: Path) -> list[str]:
    """lm-eval's own kobest task files, reading the local JSONL instead of the hub."""
    import lm_eval

    source = Path(lm_eval.__file__).parent / "tasks" / "kobest"
    shutil.copy(source / "utils.py", folder / "utils.py")
    names = []
    for task in TASKS:
        text = (source / f"{task}.yaml").read_text(encoding="utf-8")
        name = task.removeprefix("kobest_")
        files = {s: str(data_dir / name / f"{s}.jsonl") for s in ("train", "validation", "test")}
        text = text.replace(f"task: {task}", f"task: local_{task}")
        text = text.replace("dataset_path: skt/kobest_v1", "dataset_path: json")
        text = text.replace(f"dataset_name: {name}", "dataset_kwargs:\n  data_files: " + json.dumps(files))
        (folder / f"local_{task}.yaml").write_text(text, encoding="utf-8")
        names.append(f"local_{task}")
    return names


def run_lm_eval(model_dir: Path, tasks: list[str], include: Path, shots: int, limit: int, batch_size: int):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
                          num_fewshot=shots, limit=limit, batch_size=batch_size, log_samples=True,
                          task_manager=TaskManager(include_path=str(include)), device="cpu")
    return out, time.perf_counter() - start


def compare(lm, ours_results, ours_samples, shots: int) -> tuple[float, float]:
    """Largest metric and log-likelihood differences between the two runs."""
    metric_diff, ll_diff = 0.0, 0.0
    for task in TASKS:
        theirs = lm["results"][f"local_{task}"]
        mine = ours_results[task][str(shots)]
        metric_diff = max(metric_diff, abs(theirs["acc,none"] - mine["acc"]), abs(theirs["f1,none"] - mine["macro_f1"]))
        if "acc_norm,none" in theirs:
            metric_diff = max(metric_diff, abs(theirs["acc_norm,none"] - mine["acc_norm"]))
        ours_by_doc = {s["doc_id"]: s["loglikelihoods"] for s in ours_samples if s["task"] == task}
        for sample in lm["samples"][f"local_{task}"]:
            lls = [r[0] for r in sample["filtered_resps"]]
            ll_diff = max(ll_diff, float(np.max(np.abs(np.array(lls) - np.array(ours_by_doc[sample["doc_id"]])))))
    return metric_diff, ll_diff


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a saved model folder (default: a small random one)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for the small random model")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "kobest" / "kobest_v1")
    parser.add_argument("--shots", default="5,50")
    parser.add_argument("--limit", type=int, default=40, help="test documents per task")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="neoxko-kobest-"))
    model_dir = args.model or small_model(work / "model", args.tokenizer)
    include = work / "tasks"
    include.mkdir()
    lm_tasks = lm_eval_tasks(include, args.data_dir)
    from neoxko.checkpoint import load_model
    from neoxko.tokenizer import load_tokenizer

    print(f"model {model_dir}, {args.limit} test documents per task, torch threads {args.threads}; both times "
          "include loading the model and the data\n")
    print("| shots | lm-eval s | neoxko s | speedup | max metric diff | max loglik diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for shots in map(int, args.shots.split(",")):
        lm, lm_seconds = run_lm_eval(model_dir, lm_tasks, include, shots, args.limit, args.batch_size)
        settings = EvalSettings(tasks=list(TASKS), shots=[shots], data_dir=str(args.data_dir), limit=args.limit)
        start = time.perf_counter()
        scorer = NeoxkoScorer(load_model(model_dir, dtype="float32"), load_tokenizer(model_dir))
        results, samples = evaluate(scorer, settings, progress=False)
        ours_seconds = time.perf_counter() - start
        metric_diff, ll_diff = compare(lm, results, samples, shots)
        ok = "ok" if metric_diff <= 1e-6 and ll_diff <= 1e-4 else "MISMATCH"
        print(f"| {shots} | {lm_seconds:.1f} | {ours_seconds:.1f} | {lm_seconds / ours_seconds:.1f}x | "
              f"{metric_diff:.2e} | {ll_diff:.2e} {ok} |", flush=True)


if __name__ == "__main__":
    main()
