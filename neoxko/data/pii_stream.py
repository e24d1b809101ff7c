"""replace_pii over text that arrives in pieces: a streamed generation is masked without leaking a digit early."""

import re
from collections import Counter

from neoxko.data.pii import TOKENS, Span, find_pii

_DIGIT = "0-9\uff10-\uff19"
_SEPARATOR = r" \t\-.()+\uff0d\u2010-\u2014\u2212\u3161\u1173\uff0e\uff08\uff09\uff0b\u3000\xa0"
# A number as the replacer may see it: digits with separators between, and any separators before.
_NUMBER = re.compile(rf"[{_SEPARATOR}]*[{_DIGIT}](?:[{_SEPARATOR}]*[{_DIGIT}])*")
_TRAILING_SEPARATORS = re.compile(rf"[{_SEPARATOR}]*$")  # may be the start of a number: "(", "+"


class PIIStream:
    """replace_pii over text that arrives in pieces (a streamed generation), never leaking a digit early.

    A number is held back until LOOKAHEAD characters follow its last digit, because what comes
    right after it can decide it (a further digit group, a bank name after an account number);
    the already-emitted CONTEXT characters before it are searched for cues (계좌, 전화, ...).
    flush() decides what is still held at the end. .masked counts the replaced values by label.
    """

    LOOKAHEAD = 16
    CONTEXT = 64
    BLOCK = 4096

    def __init__(self):
        self.raw = ""  # text seen, from CONTEXT characters before the emitted point on
        self.done = 0  # how much of raw has been emitted
        self.base = 0  # where raw starts in the whole text
        self.forced: list[Span] = []  # spans of a pushed prompt, in whole-text offsets
        self.masked: Counter = Counter()

    def push_prompt(self, prompt: str) -> str:
        """Take text that is complete in itself (an echoed prompt): its PII is masked as it stands, even
        when what the model writes next (more digits) would make the whole no longer look like PII."""
        start = self.base + len(self.raw)
        self.forced += [Span(start + s.start, start + s.end, s.label) for s in find_pii(prompt)]
        return self.push(prompt)

    def push(self, piece: str) -> str:
        self.raw += piece
        cut = max(self.done, _TRAILING_SEPARATORS.search(self.raw).start())
        for number in _NUMBER.finditer(self.raw, self.done):
            if number.end() > len(self.raw) - self.LOOKAHEAD:
                cut = min(cut, number.start())
                break
        return self._emit(cut)

    def flush(self) -> str:
        return self._emit(len(self.raw))

    @property
    def total(self) -> int:
        return sum(self.masked.values())

    def _emit(self, cut: int) -> str:
        spans = self._spans()
        for span in spans:
            if span.start < cut < span.end:
                cut = span.start
        parts, last = [], self.done
        for span in spans:
            if span.end <= cut:
                parts += [self.raw[last:span.start], TOKENS[span.label]]
                last = span.end
                self.masked[span.label] += 1
        parts.append(self.raw[last:cut])
        keep = max(0, cut - self.CONTEXT)
        if "\n" in self.raw[:cut]:  # keep the block since the last blank line: a table's header stays in view
            blank = self.raw.rfind("\n\n", 0, cut)
            block = blank + 2 if blank >= 0 else 0
            if cut - block <= self.BLOCK:
                keep = min(keep, block)
        self.raw, self.done, self.base = self.raw[keep:], cut - keep, self.base + keep
        self.forced = [f for f in self.forced if f.end > self.base + self.done]
        return "".join(parts)

    def _spans(self) -> list[Span]:
        """PII in the text not yet emitted; a prompt's own spans win where they overlap."""
        forced = [Span(f.start - self.base, f.end - self.base, f.label) for f in self.forced]
        found = [s for s in find_pii(self.raw) if all(s.end <= f.start or s.start >= f.end for f in forced)]
        return sorted((s for s in found + forced if s.start >= self.done), key=lambda s: s.start)
