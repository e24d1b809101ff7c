"""KoBEST tasks as lm-evaluation-harness 0.4.x defines them: data, prompts, choices, few-shot contexts.

Prompt styles:
- "harness": lm-evaluation-harness 0.4.x (tasks/kobest): COPA's connector has two spaces before it
  (f"{premise} {' 왜냐하면'}"), few-shot examples come from train through one random.Random(1234) per
  task, which draws sample(train, k) once per test document, in order.
- "polyglot": the harness branch the Polyglot-Ko card used: one space before the COPA connector, test
  documents shuffled with random.Random(42), and that same generator drawing the examples.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from neoxko.errors import NeoxkoError

TASKS = ("kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg")
GROUPS = {"kobest": TASKS}
FEWSHOT_DELIMITER, TARGET_DELIMITER = "\n\n", " "
HARNESS_SEED, POLYGLOT_SEED = 1234, 42
_FIELDS = {
    "boolq": ("paragraph", "question", "label"),
    "copa": ("premise", "question", "alternative_1", "alternative_2", "label"),
    "wic": ("word", "context_1", "context_2", "label"),
    "hellaswag": ("context", "ending_1", "ending_2", "ending_3", "ending_4", "label"),
    "sentineg": ("sentence", "label"),
}


@dataclass(frozen=True)
class Doc:
    """One example: the prompt text, its choices and the index of the right one."""

    text: str
    choices: tuple[str, ...]
    label: int
    raw: dict


def make_doc(task: str, row: dict, style: str = "harness") -> Doc:
    name = task.removeprefix("kobest_")
    label = int(row["label"])
    if name == "boolq":
        return Doc(f"{row['paragraph']} 질문: {row['question']} 답변: ", ("아니오", "예"), label, row)
    if name == "copa":
        connector = {"원인": "왜냐하면", "결과": "그래서"}[row["question"].strip()]
        space = "  " if style == "harness" else " "
        return Doc(f"{row['premise']}{space}{connector}", (row["alternative_1"], row["alternative_2"]), label, row)
    if name == "wic":
        text = f"문장1: {row['context_1']} 문장2: {row['context_2']} 두 문장에서 {row['word']}가 같은 뜻으로 쓰였나?"
        return Doc(text, ("아니오", "예"), label, row)
    if name == "hellaswag":
        endings = tuple(row[f"ending_{i}"] for i in range(1, 5))
        return Doc(f"문장: {row['context']}", endings, label, row)
    if name == "sentineg":
        return Doc(f"문장: {row['sentence']} 긍부정:", ("부정", "긍정"), label, row)
    raise NeoxkoError(f"unknown task {task!r}")


def resolve_tasks(names: list[str]) -> list[str]:
    """Task names with groups expanded, in the order given, each once."""
    out: list[str] = []
    for name in names:
        for task in GROUPS.get(name, (name,)):
            if task not in TASKS:
                raise NeoxkoError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} and the group 'kobest'")
            if task not in out:
                out.append(task)
    return out


def load_split(task: str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """Rows of a split, from a local folder in the skt/kobest_v1 layout or from the hub dataset."""
    name = task.removeprefix("kobest_")
    if data_dir is None:
        return _load_hub(name, split)
    path = Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file():
        raise NeoxkoError(f"{path} is missing: --data-dir needs the skt/kobest_v1 layout (<task>/<split>.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [k for k in _FIELDS[name] if k not in row]
                if missing:
                    raise KeyError(", ".join(missing))
                make_doc(task, row)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise NeoxkoError(f"{path}:{n}: malformed {name} row ({type(e).__name__}: {e}); "
                                  f"expected fields {', '.join(_FIELDS[name])}") from None
            rows.append(row)
    return rows


def _load_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise NeoxkoError("reading skt/kobest_v1 from the hub needs `pip install datasets`; "
                          "or pass --data-dir with a local copy") from None
    try:
        return list(datasets.load_dataset("skt/kobest_v1", name, split=split))
    except Exception as e:  # network, authentication and cache errors all end here
        raise NeoxkoError(f"could not load skt/kobest_v1/{name} ({split}) from the hub: {e}; "
                          "pass --data-dir with a local copy") from None


@dataclass(frozen=True)
class Request:
    """A test document with its full few-shot context, ready to score."""

    doc_id: int
    context: str
    doc: Doc


def build_requests(task: str, shots: int, data_dir: str | Path | None, style: str = "harness",
                   limit: int | None = None) -> list[Request]:
    test = [make_doc(task, row, style) for row in load_split(task, "test", data_dir)]
    train = [make_doc(task, row, style) for row in load_split(task, "train", data_dir)] if shots else []
    if shots > len(train) and shots:
        raise NeoxkoError(f"{task}: {shots} shots asked for, but train has only {len(train)} examples")
    if style == "harness":
        rng = random.Random(HARNESS_SEED)
        order = list(range(len(test)))
    elif style == "polyglot":
        rng = random.Random(POLYGLOT_SEED)
        order = list(range(len(test)))
        rng.shuffle(order)
    else:
        raise NeoxkoError(f"unknown prompt style {style!r}; use harness or polyglot")
    if limit is not None:
        order = order[:limit]
    requests = []
    for doc_id in order:
        doc = test[doc_id]
        examples = rng.sample(train, shots) if shots else []
        context = "".join(ex.text + TARGET_DELIMITER + ex.choices[ex.label] + FEWSHOT_DELIMITER for ex in examples)
        requests.append(Request(doc_id, context + doc.text, doc))
    return requests
