"""Running KoBEST: score every task at every shot count, then write results, samples, a table and a plot."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from neoxko.errors import NeoxkoError
from neoxko.evaluate.metrics import accuracy, macro_f1, macro_f1_stderr, one_class_warning, prediction_counts
from neoxko.evaluate.scoring import HFScorer, Item, _batches, _row_length, encode_item, fit_window
from neoxko.evaluate.tasks import TARGET_DELIMITER, TASKS, build_requests

# The seed model card's GPT-NeoX-Ko 1.3B row (../shared/seed), by shot count, in task order.
CARD = {1: [0.659, 0.6993, 0.6292, 0.3884, 0.8427], 5: [0.6309, 0.7053, 0.656, 0.3984, 0.7979],
        10: [0.5174, 0.7072, 0.6567, 0.417, 0.8444], 50: [0.49, 0.7097, 0.5834, 0.4416, 0.7382]}
CARD_ORDER = ("kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg")


@dataclass(frozen=True)
class EvalSettings:
    tasks: list[str]
    shots: list[int]
    data_dir: str | None = None
    prompt_style: str = "harness"
    limit: int | None = None
    batch_tokens: int = 4096
    extra: dict = field(default_factory=dict)


def evaluate(scorer, settings: EvalSettings, progress: bool = True) -> tuple[dict, list[dict]]:
    """Results {task: {shots: metrics}} and per-document samples. Under torchrun, ranks share the batches."""
    results: dict[str, dict[str, dict]] = {}
    samples: list[dict] = []
    for task in settings.tasks:
        for shots in settings.shots:
            requests = build_requests(task, shots, settings.data_dir, settings.prompt_style, settings.limit)
            items = [encode_item(scorer.encode, r.context, [TARGET_DELIMITER + c for c in r.doc.choices])
                     for r in requests]
            lls = shared_loglikelihoods(scorer, items, f"{task} {shots}-shot", progress)
            results.setdefault(task, {})[str(shots)] = task_metrics(task, requests, lls)
            samples += [{"task": task, "shots": shots, "doc_id": r.doc_id, "prompt": r.doc.text,
                         "choices": list(r.doc.choices), "label": r.doc.label, "loglikelihoods": ll,
                         "pred": int(np.argmax(ll))} for r, ll in zip(requests, lls, strict=True)]
    if set(TASKS) <= set(results):
        results["kobest"] = {str(k): group_metrics([results[t][str(k)] for t in TASKS]) for k in settings.shots}
    return results, samples


def group_metrics(per_task: list[dict]) -> dict:
    """lm-evaluation-harness's group score: task metrics averaged with weights by task size."""
    sizes = np.array([m["n"] for m in per_task], dtype=float)
    out = {"n": int(sizes.sum())}
    for metric in ("acc", "macro_f1"):
        out[metric] = float(np.average([m[metric] for m in per_task], weights=sizes))
    return out


def task_metrics(task: str, requests, lls: list[list[float]]) -> dict:
    golds = [r.doc.label for r in requests]
    preds = [int(np.argmax(ll)) for ll in lls]
    acc, acc_stderr = accuracy(preds, golds)
    out = {"acc": acc, "acc_stderr": acc_stderr, "macro_f1": macro_f1(preds, golds),
           "macro_f1_stderr": macro_f1_stderr(preds, golds), "n": len(requests)}
    if task == "kobest_hellaswag":
        # lm-evaluation-harness's acc_norm: log-likelihood per character of the choice (without the space)
        norm = [int(np.argmax(np.array(ll) / np.array([len(c) for c in r.doc.choices], dtype=float)))
                for r, ll in zip(requests, lls, strict=True)]
        out["acc_norm"], out["acc_norm_stderr"] = accuracy(norm, golds)
    out["pred_counts"] = prediction_counts(preds, len(requests[0].doc.choices)) if requests else []
    if warning := one_class_warning(out["pred_counts"]):
        out["warning"] = warning
    return out


def rank_device(device: str | None) -> str:
    """The device this rank scores on: under torchrun 'cuda' (the default on a GPU machine) means
    cuda:LOCAL_RANK, so ranks never share a GPU; an explicit index or 'cpu' is kept."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def join_torchrun() -> tuple[int, int]:
    """(rank, world size), joining torchrun's process group on the first call; (0, 1) without torchrun.

    On GPUs the group is NCCL's and each rank first takes its own GPU: NCCL's collectives run on the current
    device, which is cuda:0 on every rank until set."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def shared_loglikelihoods(scorer, items: list[Item], desc: str, progress: bool = True, **kwargs) -> list[list]:
    """scorer.loglikelihoods(items), its batches dealt out over torchrun's ranks; every rank gets every score.

    A rank scores the very batches one process would (same rows, same padding), so each score equals the
    one-process score bit for bit; splitting by document would change the batches, and so the rounding."""
    rank, world = join_torchrun()
    batches = scorer_batches(scorer, items)
    with tqdm(total=sum(map(len, batches[rank::world])), desc=desc, unit="row",
              disable=not progress or rank != 0) as bar:
        if world == 1:
            return scorer.loglikelihoods(items, bar, **kwargs)
        mine = []  # (item, branch, score)
        for batch in batches[rank::world]:
            scores = scorer.loglikelihoods([row for _, row, _ in batch], **kwargs)
            mine += [(n, i, score) for (n, _, which), row_scores in zip(batch, scores, strict=True)
                     for i, score in zip(which, row_scores, strict=True)]
            bar.update(len(batch))
    out = [[None] * len(item.branches) for item in items]
    for n, i, score in gather_everywhere(mine):
        out[n][i] = score
    return out


def scorer_batches(scorer, items: list[Item]) -> list[list[tuple[int, Item, list[int]]]]:
    """The batches scorer.loglikelihoods(items) scores, in its order: (item, row, the item's branches the row holds).

    A batch's rows, handed back to the scorer, come out as that one batch again."""
    if isinstance(scorer, HFScorer):  # one row per choice, cut to the window
        rows = [(n, Item(item.context, [branch]), [i]) for n, item in enumerate(items)
                for i, branch in enumerate(item.branches)]

        def length(row: Item) -> int:
            return min(len(row.context) + len(row.branches[0]), scorer.max_length + 1) - 1
    else:  # NeoxkoScorer: the choices share their context in one row
        rows = [(n, part, which) for n, item in enumerate(items) for part, which in fit_window(item, scorer.max_length)]
        length = _row_length
    rows.sort(key=lambda r: -length(r[1]))
    return list(_batches(rows, scorer.batch_tokens, lambda r: length(r[1])))


def gather_everywhere(share: list) -> list:
    """Every rank's share, concatenated in rank order, on every rank."""
    _, world = join_torchrun()
    if world == 1:
        return share
    import torch.distributed as dist

    shares = [None] * world
    dist.all_gather_object(shares, share)
    return [x for s in shares for x in s]


def write_outputs(folder: str | Path, model_name: str, settings: EvalSettings, results: dict,
                  samples: list[dict]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = {"model": model_name, "settings": asdict(settings), "results": results}
    (folder / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with (folder / "samples.jsonl").open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    (folder / "results.md").write_text(markdown_table(model_name, settings, results), encoding="utf-8")
    plot(folder / "scores.png", results)
    return folder


def markdown_table(model_name: str, settings: EvalSettings, results: dict) -> str:
    """The card's layout: one table per shot count, macro-F1 per task and their average."""
    tasks = [t for t in CARD_ORDER if t in results]
    lines = [f"# KoBEST: {model_name}", "",
             f"prompt style `{settings.prompt_style}`, test split" + (f", first {settings.limit} documents"
                                                                       if settings.limit else "") + ", macro-F1", ""]
    for shots in settings.shots:
        header = "| model | " + " | ".join(t.removeprefix("kobest_") for t in tasks) + " | average |"
        lines += [f"- the number of few shot examples = {shots}", "", header,
                  "|---|" + "---:|" * (len(tasks) + 1)]
        ours = [results[t][str(shots)]["macro_f1"] for t in tasks]
        lines.append(f"| {model_name} | " + " | ".join(f"{v:.4f}" for v in ours) + f" | {np.mean(ours):.4f} |")
        if shots in CARD and len(tasks) == len(CARD_ORDER):
            card = CARD[shots]
            lines.append("| GPT-NeoX-Ko 1.3B (model card) | " + " | ".join(f"{v:.4f}" for v in card)
                         + f" | {np.mean(card):.4f} |")
        lines.append("")
    warnings = [f"- {t} {s}-shot: {m['warning']}" for t in tasks for s, m in results[t].items() if "warning" in m]
    if warnings:
        lines += ["Warnings:", *warnings, ""]
    return "\n".join(lines)


def plot(path: Path, results: dict) -> Path | None:
    """Macro-F1 (and accuracy) against shot count, one panel per task; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = [t for t in TASKS if t in results]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        shots = sorted(results[task], key=int)
        xs = [int(s) for s in shots]
        for metric in ("macro_f1", "acc"):
            ys = [results[task][s][metric] for s in shots]
            errs = [results[task][s][f"{metric}_stderr"] for s in shots]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=metric)
        ax.set_title(task.removeprefix("kobest_"))
        ax.set_xlabel("shots")
        ax.set_ylim(0, 1)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_scorer(model: str, backend: str, dtype: str | None, device: str | None, batch_tokens: int):
    """A scorer for a neoxko checkpoint, or for any transformers causal LM (backend 'hf'), on this rank's device."""
    device = rank_device(device)
    if backend == "neoxko":
        from neoxko.checkpoint import load_model
        from neoxko.evaluate.scoring import NeoxkoScorer
        from neoxko.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model)  # a missing tokenizer fails here, before the weights load
        return NeoxkoScorer(load_model(model, dtype=dtype, device=device), tokenizer, batch_tokens)
    if backend == "hf":
        from neoxko.checkpoint import BUILTIN

        model = str(BUILTIN.get(model, model))
        try:
            import transformers
        except ImportError:
            raise NeoxkoError("--backend hf needs transformers: pip install transformers") from None
        from neoxko.evaluate.scoring import HFScorer

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise NeoxkoError(f"no tokenizer for {model}: {e}") from None
        if not tokenizer("한국어 문장", add_special_tokens=False)["input_ids"]:
            # transformers 5 builds an empty tokenizer for a folder without tokenizer files
            raise NeoxkoError(f"no tokenizer for {model}: the one transformers loads encodes text to nothing; "
                              "are tokenizer.json and tokenizer_config.json missing?")
        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
        hf = transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs).to(device).eval()
        return HFScorer(hf, tokenizer, batch_tokens)
    raise NeoxkoError(f"unknown backend {backend!r}; use neoxko or hf")
