"""Korean PII replacement: resident registration, phone and bank account numbers -> <|rrn|>, <|tel|>, <|acc|>.

Recall first (docs/pii-policy.md): a number whose shape only PII has is masked wherever it stands, unless a
documented hard negative applies; shapes that other numbers share are decided by context (../shared/pii):
- rrn: YYMMDD + [1-8] + 6 digits with a real birth date, in any separator; checksums are not
  required (numbers issued since 2020-10-05 have none); barcode, order and corporate contexts veto.
- tel: Korean dialable numbers (mobile, 02, regional, 070, 050X, 080, 060, +82 forms, bracketed
  area codes), representative 15XX/16XX/18XX numbers only next to a phone word.
- acc: 10-16 digits in any grouping, only with an account word or a bank name before (or a bank
  name just after); a phone-shaped number right after an account cue is an account (평생계좌).
The shapes are in shapes.py, the rules that judge them in rules.py; here the text is normalised (normalise.py),
the rules run over the windows of the pre-scan, and the most confident of overlapping candidates is kept.
"""

import bisect
import itertools
import operator
from collections import Counter
from typing import NamedTuple

from neoxko.pii.context import open_keys
from neoxko.pii.cues import CUE_KINDS
from neoxko.pii.normalise import (
    ANY_DIGIT,
    DIGIT_OR_NEEDS_NORMALISING,
    FOLD_LOOK_ALIKES,
    LOOK_ALIKE,
    LOOK_ALIKE_NEAR_DIGIT,
    NEEDS_NORMALISING,
    Normalised,
)
from neoxko.pii.rules import Context, find_accounts, find_foreign, find_phones, find_representatives, find_rrns
from neoxko.pii.shapes import MAY_PHONE, MAY_REPRESENTATIVE, MAY_RRN, Candidate, number_windows

TOKENS = {"rrn": "<|rrn|>", "tel": "<|tel|>", "acc": "<|acc|>"}


class Span(NamedTuple):
    start: int
    end: int
    label: str  # "rrn", "tel" or "acc"


def find_pii(text: str) -> list[Span]:
    """The PII spans of text, sorted and non-overlapping."""
    first = DIGIT_OR_NEEDS_NORMALISING.search(text)
    if first is None:  # most text has no digit: nothing to find
        return []
    if NEEDS_NORMALISING.search(text, first.start()):  # other digits, invisible characters: the rare path
        if not ANY_DIGIT.search(text):
            return []
        normalised = Normalised(text)
        spans = _find(normalised.text)
        if normalised.kept is None:
            return spans
        new = tuple.__new__
        return [new(Span, (*normalised.original(s.start, s.end), s.label)) for s in spans]
    look = LOOK_ALIKE.search(text)  # "010–1234–5678", "010·1234·5678": fold them (the same length)
    if look is not None and LOOK_ALIKE_NEAR_DIGIT.search(text, max(look.start() - 2, 0)):
        return _find(text.translate(FOLD_LOOK_ALIKES))
    return _find(text)


def _find(folded: str) -> list[Span]:
    windows = number_windows(folded)
    if not windows:
        return []
    ctx = Context(open_keys(folded))
    # Most text has no account word or bank name anywhere: then it holds no account (the cheap test first)
    accounts = CUE_KINDS["acc"].search(ctx.text) is not None
    found: list[Candidate] = []
    abroad = "(" in folded or "+" in folded
    for a, b, digits, shapes in windows:  # accounts, RRNs, phones: the order ties are broken in (never overlapping)
        if accounts and digits >= 10:
            find_accounts(ctx, a, b, found)
        if shapes & MAY_RRN:
            find_rrns(ctx, a, b, found)
        if shapes & MAY_PHONE:
            find_phones(ctx, a, b, found)
            if abroad:
                find_foreign(ctx, a, b, found)
        if shapes & MAY_REPRESENTATIVE:
            find_representatives(ctx, a, b, found)
    return _resolve(found)


def replace_pii(text: str, context: str = "") -> str:
    """text with each resident registration, phone and account number replaced by its token."""
    return replace_pii_counted(text, context)[0]


def replace_pii_counted(text: str, context: str = "") -> tuple[str, Counter]:
    """replace_pii, and how many values of each label were replaced. context is read before text, for its cues
    (the header line of the table that text continues), and is not part of what comes back."""
    if context:
        shift = len(context) + 1
        new = tuple.__new__
        spans = [new(Span, (s.start - shift, s.end - shift, s.label))
                 for s in find_pii(context + "\n" + text) if s.start >= shift]
    else:
        spans = find_pii(text)
    return apply_spans(text, spans)


def apply_spans(text: str, spans: list[Span]) -> tuple[str, Counter]:
    """text with the spans (sorted, disjoint) replaced by their tokens, and the count of each label."""
    if not spans:
        return text, Counter()
    parts, last = [], 0
    for span in spans:
        parts += [text[last:span.start], TOKENS[span.label]]
        last = span.end
    parts.append(text[last:])
    return "".join(parts), Counter(s.label for s in spans)


_START_OF = operator.itemgetter(1)


def _resolve(candidates: list[Candidate]) -> list[Span]:
    """Keep the most confident of overlapping candidates (ties: the longer span, then the earlier one)."""
    new = tuple.__new__  # (a NamedTuple's own constructor costs more than the rest of this function)
    if len(candidates) <= 1:  # (most lines)
        return [new(Span, candidates[0][1:])] if candidates else []
    by_start = sorted(candidates, key=_START_OF)
    if all(a[2] <= b[1] for a, b in itertools.pairwise(by_start)):  # nothing overlaps: keep them all
        return [new(Span, c[1:]) for c in by_start]
    chosen: list[tuple[int, int, str]] = []  # disjoint, by start (a bisect finds the one a candidate may overlap)
    starts: list[int] = []
    for _, start, end, label in sorted(candidates, key=lambda c: (-c[0], c[1] - c[2], c[1])):
        i = bisect.bisect_left(starts, end)  # chosen[:i] start before this one ends: only chosen[i - 1] may reach in
        if i == 0 or chosen[i - 1][1] <= start:
            chosen.insert(i, (start, end, label))
            starts.insert(i, start)
    return [new(Span, c) for c in chosen]
