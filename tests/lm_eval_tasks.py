"""lm-eval's own KoBEST task files, pointed at the repo's fixture (shared by the lm-eval tests)."""

from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "kobest"
TASKS = ["kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"]


def lm_eval_tasks(folder: Path, data: Path = FIXTURE) -> Path:
    """lm-eval's own KoBEST task files, pointed at local data (the fixture, or a skt/kobest_v1 folder) instead of the
    hub (and f1 without the hub's `evaluate` download; the aggregation is lm-eval's own macro_f1_score)."""
    import lm_eval

    original = Path(lm_eval.__file__).parent / "tasks" / "kobest"
    folder.mkdir()
    (folder / "utils.py").write_text("from lm_eval.tasks.kobest.utils import macro_f1_score  # noqa: F401\n")
    for task in TASKS:
        sub = task.removeprefix("kobest_")
        metrics = ["acc", "acc_norm"] if task == "kobest_hellaswag" else ["acc"]
        lines = [f"task: neoxko_{task}", f"include: {original / (task + '.yaml')}", "dataset_path: json",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:",
                 f"    train: {data / sub / 'train.jsonl'}", f"    test: {data / sub / 'test.jsonl'}",
                 "validation_split: null", "metric_list:"]
        for metric in metrics:
            lines += [f"  - metric: {metric}", "    aggregation: mean", "    higher_is_better: true"]
        lines += ["  - metric: f1", "    aggregation: !function utils.macro_f1_score", "    average: macro",
                  "    higher_is_better: true"]
        (folder / f"{task}.yaml").write_text("\n".join(lines) + "\n")
    return folder
