"""Instruction data: the formats people have, rendered by a chat template, tokenised with the prompt masked,
then packed (several examples per row, none seeing another) or padded, and drawn without state.

Formats, one object per JSONL line or a JSON list of objects:
- alpaca (Alpaca, KoAlpaca): `instruction`, optional `input`, `output`;
- chat: `messages: [{role, content}, ...]` (system, user, assistant), every assistant turn is trained on;
- pairs: `prompt` and `response`.
Each row becomes chat messages and the template renders them, so training text and the prompts
`neoxko chat`, `neoxko serve` and transformers' `apply_chat_template` build are the same text. The loss
falls on the assistant turns only: each one's span is what rendering the conversation up to it adds to the
prompt that rendering the turns before it with the generation prompt gives.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

from neoxko.errors import NeoxkoError
from neoxko.train.data import IGNORE, Batch

FORMATS = ("alpaca", "chat", "pairs")
ROLES = ("system", "user", "assistant")


class DataError(NeoxkoError):
    pass


@dataclass(frozen=True)
class Example:
    messages: tuple  # ({"role", "content"}, ...)
    where: str  # file:line


@dataclass(frozen=True)
class Encoded:
    ids: list
    labels: list  # the next-token target at each position, IGNORE where the loss does not fall
    where: str


def read_examples(paths: list, fmt: str = "auto", system: str | None = None) -> list[Example]:
    """Every row of every file as chat messages; a bad row is named by file and line."""
    examples = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"fine-tuning data {path} does not exist")
        for where, row in rows(path):
            examples.append(Example(to_messages(row, fmt, where, system), where))
    if not examples:
        raise DataError(f"no examples in {', '.join(map(str, paths))}")
    return examples


def rows(path: Path):
    """(file:line, object) of a .json list or a .jsonl file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file holds one list of objects, "
                            "a .jsonl file one object per line") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file must hold a list of examples, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield f"{path}:item {i + 1}", row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); a .jsonl file holds one object per line") from None


def detect_format(row) -> str:
    if isinstance(row, dict):
        if "messages" in row:
            return "chat"
        if "instruction" in row:
            return "alpaca"
        if "prompt" in row:
            return "pairs"
    return "unknown"


def to_messages(row, fmt: str, where: str, system: str | None = None) -> tuple:
    if not isinstance(row, dict):
        raise DataError(f"{where}: an example must be a JSON object, got {type(row).__name__}")
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind not in FORMATS:
        raise DataError(f"{where}: cannot tell the format of an example with keys {sorted(row)[:6]}; alpaca needs "
                        "instruction/output, chat needs messages, pairs needs prompt/response (or set data_format)")
    if kind == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i + 1} must be {{role: system|user|assistant, content: text}}, "
                                f"got {str(m)[:80]}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: the conversation has no assistant message to train on")
        return tuple(out)
    keys = ("instruction", "output") if kind == "alpaca" else ("prompt", "response")
    missing = [k for k in keys if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise DataError(f"{where}: a {kind} example needs non-empty text in {' and '.join(keys)}; "
                        f"{', '.join(missing)} is missing or empty")
    question = row[keys[0]]
    if kind == "alpaca" and isinstance(row.get("input"), str) and row["input"].strip():
        question = f"{question}\n\n{row['input']}"
    head = ({"role": "system", "content": system},) if system else ()
    return (*head, {"role": "user", "content": question}, {"role": "assistant", "content": row[keys[1]]})


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """A stable split: an example is held out by the hash of its text, whatever the file order."""
    if not 0 <= fraction < 1:
        raise DataError(f"eval_split must be in [0, 1), got {fraction}")
    cut = int(fraction * 2**64)
    held = [xxhash.xxh3_64_intdigest(json.dumps(e.messages, ensure_ascii=False), seed) < cut for e in examples]
    return ([e for e, h in zip(examples, held, strict=True) if not h],
            [e for e, h in zip(examples, held, strict=True) if h])


def encode(example: Example, template: str, tokenizer) -> Encoded:
    """Token ids of the rendered conversation, with targets on the assistant turns' tokens only."""
    from neoxko.chat_template import render

    variables = {"bos_token": "", "eos_token": tokenizer.eos_token or ""}
    messages = list(example.messages)
    text = render(template, messages, add_generation_prompt=False, **variables)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(template, messages[:i], add_generation_prompt=True, **variables)
        upto = render(template, messages[:i + 1], add_generation_prompt=False, **variables)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError(f"{example.where}: the chat template does not render the conversation as a growing "
                            "prefix (the prompt for a turn is not the start of the text with it), so the answer "
                            "tokens cannot be found; use a template that renders turn by turn")
        spans.append((len(prompt), len(upto.rstrip())))
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    # a token is an answer token if it starts inside an answer span; its label sits one position earlier
    starts = np.array([start for start, _ in encoding.offsets])
    answer = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        answer |= (starts >= lo) & (starts < hi)
    labels = [IGNORE] * len(ids)
    for t in range(1, len(ids)):
        if answer[t]:
            labels[t - 1] = ids[t]
    return Encoded(ids, labels, example.where)


def fit(encoded: list[Encoded], seq_len: int, overlong: str) -> tuple[list[Encoded], dict]:
    """Examples that fit in seq_len tokens; longer ones are truncated, dropped or refused (overlong)."""
    kept, report = [], {"examples": len(encoded), "overlong": 0, "dropped": 0, "first_overlong": None}
    for e in encoded:
        if len(e.ids) > seq_len:
            report["overlong"] += 1
            report["first_overlong"] = report["first_overlong"] or e.where
            if overlong == "error":
                raise DataError(f"{e.where}: the example is {len(e.ids)} tokens, more than seq_len {seq_len}; raise "
                                "seq_len, or set overlong: truncate or overlong: drop")
            if overlong == "drop":
                report["dropped"] += 1
                continue
            e = Encoded(e.ids[:seq_len], e.labels[:seq_len - 1] + [IGNORE], e.where)
        if all(label == IGNORE for label in e.labels):
            report["dropped"] += 1  # nothing left to learn from (the answer was cut off)
            continue
        kept.append(e)
    return kept, report


class InstructionBatches:
    """Rows of tokens built once (packed or one example each), drawn like pretraining's batches: sample g is row
    perm_e[g mod n] of epoch e = g div n, the permutation seeded by (seed, e), so resuming and any world size
    see the same data. shuffle=False keeps the order and pads past the end with rows that carry no loss (for
    held-out evaluation, where every rank must run the same number of forwards)."""

    def __init__(self, encoded: list[Encoded], seq_len: int, pad_id: int, packing: bool, seed: int,
                 shuffle: bool = True):
        self.seq_len, self.pad_id, self.packing, self.seed, self.shuffle = seq_len, pad_id, packing, seed, shuffle
        self.rows = pack(encoded, seq_len) if packing else [[e] for e in encoded]
        self.target_counts = np.array([sum(sum(lbl != IGNORE for lbl in e.labels) for e in row)
                                       for row in self.rows], dtype=np.int64)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _index(self, g: int) -> int | None:
        n = len(self.rows)
        if not self.shuffle:
            return g if g < n else None
        epoch = g // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][g % n])

    def target_count(self, first: int, size: int) -> int:
        picked = [self._index(g) for g in range(first, first + size)]
        return int(sum(self.target_counts[i] for i in picked if i is not None))

    def batch(self, first: int, size: int) -> Batch:
        picked = [self._index(g) for g in range(first, first + size)]
        width = self.seq_len if self.packing else max(
            sum(len(e.ids) for e in self.rows[i]) for i in (p if p is not None else 0 for p in picked))
        inputs = torch.full((size, width), self.pad_id, dtype=torch.long)
        targets = torch.full((size, width), IGNORE, dtype=torch.long)
        positions = torch.zeros((size, width), dtype=torch.long)
        segments = torch.full((size, width), -1, dtype=torch.long)
        for b, i in enumerate(picked):
            row, at = self.rows[i if i is not None else 0], 0  # (past the end: row 0's tokens, no targets)
            for s, e in enumerate(row):
                n = len(e.ids)
                inputs[b, at:at + n] = torch.tensor(e.ids)
                if i is not None:
                    targets[b, at:at + n] = torch.tensor(e.labels)
                positions[b, at:at + n] = torch.arange(n)
                segments[b, at:at + n] = s
                at += n
            if at < width:  # padding: its own segment, positions counting on
                positions[b, at:] = torch.arange(width - at)
                segments[b, at:] = len(row)
        if not self.packing:
            return Batch(inputs, targets, sparse=True)
        return Batch(inputs, targets, positions, segments, sparse=True)


def pack(encoded: list[Encoded], seq_len: int) -> list[list[Encoded]]:
    """First-fit decreasing: fewer, fuller rows than filling in order (no example is split)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].ids))
    rows, room = [], []
    for i in order:
        n = len(encoded[i].ids)
        for r, left in enumerate(room):
            if left >= n:
                rows[r].append(encoded[i])
                room[r] -= n
                break
        else:
            rows.append([encoded[i]])
            room.append(seq_len - n)
    return rows
