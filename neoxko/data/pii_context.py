"""Where a number's cue word is: the text just before it, or, in a table, its column's header.

Tables are blocks of two or more lines that split into the same number of cells (by tab, `|`, comma,
or runs of two or more spaces for aligned columns); the first line of a block is its header. A number
in a data cell is judged by its header and its own cell only, never by the cells beside it, so one
row's 계좌 column does not make its 연락처 column an account. key=value and JSON keys are cues too:
`to=01012345678` reads as `to 01012345678`.
"""

import re
from bisect import bisect_right
from dataclasses import dataclass

_SPLITTERS = (("\t", re.compile("\t")), ("|", re.compile(r"\|")), (",", re.compile(",")),
              ("  ", re.compile(r" {2,}")))
MAX_CELL = 48  # longer "cells" are sentences with commas, not a table
_RULE = re.compile(r"^\s*\|?\s*:?-{3,}")  # a Markdown table's |---|---| line
# Keys of machine text whose value is the number (the = stays a boundary for every other key)
PII_KEYS = re.compile(
    r"(?<![A-Za-z_])(?:tel|phone|mobile|msisdn|hp|cell|to|from|caller|callee|sender|receiver|fax|contact|"
    r"rrn|jumin|resident_?no|ssn|account|account_no|acct|acct_no|bank_?account|refund_account|"
    r"연락처|전화|휴대폰|계좌|주민번호|주민등록번호)=", re.IGNORECASE)


@dataclass(frozen=True)
class Cell:
    start: int
    end: int
    header: str


class Structure:
    def __init__(self, text: str):
        commas: list[int] = []
        self.cells = _table_cells(text, commas) if "\n" in text.rstrip("\n") else []
        self.starts = [c.start for c in self.cells]
        if commas:  # a CSV cell's comma ends a number: "010-1234-5678,840..." is two values, not 5,840
            chars = list(text)
            for at in commas:
                chars[at] = "\t"
            text = "".join(chars)
        self.text = text

    def before(self, text: str, pos: int, window: int) -> str:
        """The text a cue for the number at pos is looked for in: its column header and its own cell, or the
        window characters before it."""
        if self.cells:
            i = bisect_right(self.starts, pos) - 1
            if i >= 0 and self.cells[i].start <= pos < self.cells[i].end:
                cell = self.cells[i]
                return cell.header + " " + text[cell.start:pos]
        return text[max(pos - window, 0):pos]

    def in_cell(self, pos: int) -> bool:
        i = bisect_right(self.starts, pos) - 1
        return i >= 0 and self.cells[i].start <= pos < self.cells[i].end


def open_keys(text: str) -> str:
    """text with the = of PII keys made a space (same length): the number after it is then a number on its own."""
    if "=" not in text:
        return text
    return PII_KEYS.sub(lambda m: m.group()[:-1] + " ", text)


def _table_cells(text: str, commas: list[int]) -> list[Cell]:
    """The data cells of the tables in text; the positions of CSV tables' delimiting commas go into commas."""
    lines, at = [], 0
    for line in text.split("\n"):
        lines.append((at, line))
        at += len(line) + 1
    cells: list[Cell] = []
    i = 0
    while i < len(lines):
        found = None
        for name, splitter in _SPLITTERS:
            n = _count(lines[i][1], name, splitter)
            if n < 2:
                continue
            j = i + 1
            while j < len(lines) and (_RULE.match(lines[j][1]) or _count(lines[j][1], name, splitter) == n):
                j += 1
            rows = [k for k in range(i + 1, j) if not _RULE.match(lines[k][1])]
            if not rows:
                continue
            splits = {k: _split(lines[k], splitter, name) for k in [i, *rows]}
            if all(len(c[2]) <= MAX_CELL for row in splits.values() for c in row):
                found = (name, j, rows, splits)
                break
        if found is None:
            i += 1
            continue
        name, j, rows, splits = found
        header = splits[i]
        if any(ch.isdigit() for c in header for ch in c[2]):
            i = j  # no header row (or a form whose first line holds a value): the text before each number is its cue
            continue
        if name == ",":
            commas.extend(c[1] for k in [i, *rows] for c in splits[k][:-1])
        for k in rows:
            row = splits[k]
            for column, (start, end, _) in enumerate(row):
                head = header[column][2] if column < len(header) else ""
                if len(header) == 2 and column == 1:  # a label / value form reads as a 2-column table: both count
                    head += " " + row[0][2]
                cells.append(Cell(start, end, head))
        i = j
    return cells


def _count(line: str, name: str, splitter: re.Pattern) -> int:
    if name == "|":
        line = line.strip().strip("|")
    if name == "  ":
        return len(splitter.split(line)) if "  " in line.strip() else 0
    n = line.count(name)
    return n + 1 if n and line.strip() else 0


def _split(line: tuple[int, str], splitter: re.Pattern, name: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each cell of a line, in whole-text offsets."""
    base, text = line
    if name == "|":
        stripped = text.strip()
        lead = text.index(stripped) if stripped else 0
        if stripped.startswith("|"):
            lead += 1
        inner = stripped.strip("|")
        base, text = base + lead, inner
    out, at = [], 0
    for m in splitter.finditer(text):
        out.append((base + at, base + m.start(), text[at:m.start()].strip()))
        at = m.end()
    out.append((base + at, base + len(text), text[at:].strip()))
    return out
