"""Scoring a PII replacer against a labelled JSONL set, by the conventions of POLICY.md."""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neoxko.errors import NeoxkoError
from neoxko.pii.replace import TOKENS, Span, find_pii

LABELS = ("rrn", "tel", "acc")
_COUNTRY_CODES = ("+82", "0082", "82")


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


@dataclass
class Report:
    strict: dict[str, Counts] = field(default_factory=lambda: {k: Counts() for k in (*LABELS, "any")})
    lenient: dict[str, Counts] = field(default_factory=lambda: {k: Counts() for k in LABELS})
    lines: int = 0
    negative_lines: int = 0
    negative_changed: int = 0
    exact_lines: int = 0
    gold_digits: int = 0
    leaked_digits: int = 0
    collateral_chars: int = 0
    seconds: float = 0.0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = ["| row | label | precision | recall | TP | FP | FN |", "|---|---|---:|---:|---:|---:|---:|"]
        for kind, counts in (("strict", self.strict), ("lenient", self.lenient)):
            for label, c in counts.items():
                rows.append(f"| {kind} | {label} | {c.precision:.3f} | {c.recall:.3f} | {c.tp} | {c.fp} | {c.fn} |")
        neg = self.negative_changed / max(self.negative_lines, 1)
        rows += [
            "",
            f"- no-PII lines changed: {self.negative_changed}/{self.negative_lines} ({neg:.1%})",
            f"- exact lines: {self.exact_lines}/{self.lines}",
            f"- gold digits leaked: {self.leaked_digits}/{self.gold_digits}",
            f"- letters and digits removed outside gold spans: {self.collateral_chars}",
            f"- throughput: {self.bytes / max(self.seconds, 1e-9) / 1e6:.1f} MB/s (find_pii only)",
        ]
        return "\n".join(rows)


def read_labelled(path: str | Path) -> list[tuple[str, list[Span]]]:
    items = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                items.append(_item(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise NeoxkoError(f"{path}:{n}: not a labelled line ({e}); need text and spans") from None
    return items


DATA = Path(__file__).parent / "data"


def builtin_sets(documents: int = 3000) -> dict[str, tuple[list[tuple[str, list[Span]]], list[str]]]:
    """The evaluation sets that come with neoxko, name -> (items, kinds): the real-text set's two halves
    (data/README.md), and the two generators' report seeds (the rules were tuned on seed 1 of each)."""
    from neoxko.pii import genres, synth

    sets = {}
    for half in ("tune", "heldout"):
        path = DATA / f"real_text_{half}.jsonl"
        sets[f"real text, {'tune' if half == 'tune' else 'held-out'} half ({path.name})"] = \
            (read_labelled(path), read_kinds(path))
    for name, records in ((f"synth.py seed 2 ({documents} lines)", synth.generate(2, documents)),
                          (f"genres.py seed 2 ({documents} documents)", genres.generate(2, documents))):
        sets[name] = ([_item(r) for r in records], [r.get("kind", "-") for r in records])
    return sets


def summary_table(sets: dict[str, tuple[list[tuple[str, list[Span]]], list[str]]],
                  find: Callable[[str], list[Span]] = find_pii) -> str:
    """Strict precision / recall per label and no-PII lines changed, a row per set."""
    rows = ["| set | lines | rrn P / R | tel P / R | acc P / R | no-PII lines changed | MB/s |",
            "|---|---:|---|---|---|---:|---:|"]
    for name, (items, _) in sets.items():
        r = score(items, find)
        cells = " | ".join(f"{r.strict[label].precision:.3f} / {r.strict[label].recall:.3f}"
                           f" ({r.strict[label].tp + r.strict[label].fn})" for label in LABELS)
        rows.append(f"| {name} | {r.lines} | {cells} | {r.negative_changed}/{r.negative_lines} | "
                    f"{r.bytes / max(r.seconds, 1e-9) / 1e6:.1f} |")
    return "\n".join(rows) + "\n\n(P / R (gold spans): strict scores by POLICY.md)"


def _item(record: dict) -> tuple[str, list[Span]]:
    return record["text"], [Span(s["start"], s["end"], "tel" if s["label"] == "tell" else s["label"])
                            for s in record["spans"]]


def read_kinds(path: str | Path) -> list[str]:
    """Each line's context kind ("kind", as `neoxko data pii-generate` writes it; "-" where a line has none)."""
    with Path(path).open(encoding="utf-8") as f:
        return [str(json.loads(line).get("kind", "-")) for line in f]


def kind_table(items: list[tuple[str, list[Span]]], kinds: list[str],
               find: Callable[[str], list[Span]] = find_pii) -> str:
    """Strict precision / recall per label and negative lines touched, for each context kind."""
    groups: dict[str, list] = {}
    for item, kind in zip(items, kinds, strict=True):
        groups.setdefault(kind, []).append(item)
    rows = ["| kind | lines | rrn P | rrn R | tel P | tel R | acc P | acc R | no-PII lines changed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, group in sorted(groups.items()):
        r = score(group, find)
        cells = " | ".join(f"{r.strict[label].precision:.3f} | {r.strict[label].recall:.3f}" for label in LABELS)
        rows.append(f"| {kind} | {r.lines} | {cells} | {r.negative_changed}/{r.negative_lines} |")
    return "\n".join(rows)


def score(items: list[tuple[str, list[Span]]], find: Callable[[str], list[Span]] = find_pii) -> Report:
    report = Report()
    for text, gold in items:
        start = time.perf_counter()
        pred = find(text)
        report.seconds += time.perf_counter() - start
        report.bytes += len(text.encode("utf-8"))
        _score_line(report, text, gold, pred)
    return report


def _score_line(report: Report, text: str, gold: list[Span], pred: list[Span]) -> None:
    report.lines += 1
    if not gold:
        report.negative_lines += 1
        report.negative_changed += bool(pred)
    strict_pairs = _match(gold, pred, lambda g, p: g.label == p.label and _strict(text, g, p))
    _count(report.strict, gold, pred, strict_pairs, by_label=True)
    _count(report.strict, gold, pred, _match(gold, pred, lambda g, p: _strict(text, g, p)), by_label=False)
    lenient_pairs = _match(gold, pred, lambda g, p: g.label == p.label and p.start < g.end and g.start < p.end)
    _count(report.lenient, gold, pred, lenient_pairs, by_label=True)
    covered = {i for p in pred for i in range(p.start, p.end)}
    inside_gold = {i for g in gold for i in range(g.start, g.end)}
    report.gold_digits += sum(text[i].isdigit() for i in inside_gold)
    report.leaked_digits += sum(text[i].isdigit() and i not in covered for i in inside_gold)
    report.collateral_chars += sum(text[i].isalnum() for i in covered - inside_gold)
    report.exact_lines += _redact(text, pred) == _redact(text, gold)


def _strict(text: str, g: Span, p: Span) -> bool:
    """p covers every required digit of g and removes no letter or digit outside it."""
    optional = _optional_positions(text, g)
    required = [i for i in range(g.start, g.end) if text[i].isdigit() and i not in optional]
    if not all(p.start <= i < p.end for i in required):
        return False
    outside = [i for i in range(p.start, p.end) if not g.start <= i < g.end]
    return not any(text[i].isalnum() for i in outside)


def _optional_positions(text: str, g: Span) -> set[int]:
    """Country-code digits and a '(0)' of an international phone number may stay outside the token."""
    if g.label != "tel":
        return set()
    body = text[g.start:g.end]
    optional = set()
    for code in _COUNTRY_CODES:
        if body.startswith(code):
            optional |= set(range(g.start, g.start + len(code)))
            break
    zero = body.find("(0)")
    if optional and zero >= 0:
        optional.add(g.start + zero + 1)
    return optional


def _match(gold, pred, ok) -> list[tuple[int, int]]:
    pairs, used = [], set()
    for gi, g in enumerate(gold):
        for pi, p in enumerate(pred):
            if pi not in used and ok(g, p):
                pairs.append((gi, pi))
                used.add(pi)
                break
    return pairs


def _count(table: dict[str, Counts], gold, pred, pairs, by_label: bool) -> None:
    matched_gold, matched_pred = {g for g, _ in pairs}, {p for _, p in pairs}
    key = (lambda s: s.label) if by_label else (lambda s: "any")
    for i, g in enumerate(gold):
        counts = table[key(g)]
        if i in matched_gold:
            counts.tp += 1
        else:
            counts.fn += 1
    for i, p in enumerate(pred):
        if i not in matched_pred:
            table[key(p)].fp += 1


def _redact(text: str, spans: list[Span]) -> str:
    out, last = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        out += [text[last:s.start], TOKENS[s.label]]
        last = s.end
    return "".join(out) + text[last:]


def errors(items: list[tuple[str, list[Span]]], find: Callable[[str], list[Span]] = find_pii) -> list[str]:
    """The lines where prediction and gold differ, as 'gold -> predicted' for reading."""
    out = []
    for text, gold in items:
        pred = find(text)
        if [(s.start, s.end, s.label) for s in pred] != [(s.start, s.end, s.label) for s in gold]:
            g = ", ".join(f"{s.label}:{text[s.start:s.end]}" for s in gold) or "-"
            p = ", ".join(f"{s.label}:{text[s.start:s.end]}" for s in pred) or "-"
            out.append(f"{text}\n    gold {g}\n    pred {p}")
    return out
