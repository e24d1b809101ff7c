"""replace_pii over text that arrives in pieces: a streamed generation is masked without leaking a digit early."""

from collections import Counter

from neoxko.pii.normalise import DECIMALS, INVISIBLE, LOOK_ALIKES
from neoxko.pii.replace import TOKENS, Span, find_pii

_DIGITS = frozenset("0123456789") | frozenset(map(chr, DECIMALS))
# What may stand between the digits of one number, or before it ("(", "+"), in any of its forms
_SEPARATORS = " \t-.()+" + "".join(char for char, ascii in LOOK_ALIKES.items() if ascii in "-.()+ ") + INVISIBLE
_NUMBER_CHARS = _DIGITS | frozenset(_SEPARATORS)


class PIIStream:
    """replace_pii over text that arrives in pieces (a streamed generation), never leaking a digit early.

    A number is held back until LOOKAHEAD characters follow its last digit, because what comes right after it can
    decide it (a further digit group, a bank name after an account number); the CONTEXT characters already emitted
    before it are searched for cues (계좌, 전화, ...), and so is the first line of the blank-line block it is in (a
    table's header). A run of digits and separators longer than LONGEST is no one value: it is decided and emitted
    up to LONGEST characters from its end, so the work per piece is bounded and the whole stream is linear.
    flush() decides what is still held at the end. .masked counts the replaced values by label.
    """

    LOOKAHEAD = 16
    CONTEXT = 64
    LONGEST = 64
    HEADER = 512  # longest first line of a block kept as its header

    def __init__(self):
        self.raw = ""  # text seen, from CONTEXT characters before the emitted point on
        self.done = 0  # how much of raw has been emitted
        self.base = 0  # where raw starts in the whole text
        self.forced: list[Span] = []  # spans of a pushed prompt, in whole-text offsets
        self.masked: Counter = Counter()
        self.header = ""  # the first line of the block the text is in, once it has left raw
        self._line, self._fresh = "", True  # the line leaving raw so far (up to HEADER + 1), whether it opens a block

    def push_prompt(self, prompt: str) -> str:
        """Take text that is complete in itself (an echoed prompt): its PII is masked as it stands, even
        when what the model writes next (more digits) would make the whole no longer look like PII."""
        start = self.base + len(self.raw)
        self.forced += [Span(start + s.start, start + s.end, s.label) for s in find_pii(prompt)]
        return self.push(prompt)

    def push(self, piece: str) -> str:
        self.raw += piece
        raw, end = self.raw, len(self.raw)
        trailing = end - len(raw.rstrip(_SEPARATORS))  # may open a number: "(", "+"
        cut = max(self.done, end - min(trailing, self.LONGEST))
        for at in range(max(self.done, end - self.LOOKAHEAD), end):  # the first digit of the last LOOKAHEAD
            if raw[at] in _DIGITS:
                limit = max(self.done, at - self.LONGEST)
                while at > limit and raw[at - 1] in _NUMBER_CHARS:  # back to the start of its number
                    at -= 1
                cut = min(cut, at)
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
        if keep:
            self._forget(self.raw[:keep])
        self.raw, self.done, self.base = self.raw[keep:], cut - keep, self.base + keep
        self.forced = [f for f in self.forced if f.end > self.base + self.done]
        return "".join(parts)

    def _forget(self, gone: str) -> None:
        """Follow the lines that leave raw, to know the first line of the current block."""
        lines = gone.split("\n")
        for line in lines[:-1]:
            line = self._line + line
            self._line = ""
            if not line.strip():
                self.header, self._fresh = "", True
            elif self._fresh:
                self.header = line if len(line) <= self.HEADER else ""
                self._fresh = False
        self._line = (self._line + lines[-1])[:self.HEADER + 1]

    def _spans(self) -> list[Span]:
        """PII in the text not yet emitted; a prompt's own spans win where they overlap."""
        forced = [Span(f.start - self.base, f.end - self.base, f.label) for f in self.forced]
        # What raw continues: the block's first line, and the start of the line raw is in (a row's first cells)
        before = self._line if len(self._line) <= self.HEADER else ""
        if self.header:
            before = self.header + "\n" + before
        if before:
            shift = len(before)
            found = [Span(s.start - shift, s.end - shift, s.label)
                     for s in find_pii(before + self.raw) if s.start >= shift]
        else:
            found = find_pii(self.raw)
        found = [s for s in found if all(s.end <= f.start or s.start >= f.end for f in forced)]
        return sorted((s for s in found + forced if s.start >= self.done), key=lambda s: s.start)
