"""Where a number's cue word is: the text just before it, or, in a table, its column's header.

Tables are blocks of two or more lines that split into the same number of cells (by tab, `|`, comma,
or runs of two or more spaces for aligned columns); the first line of a block is its header. A number
in a data cell is judged by its header and its own cell only, never by the cells beside it, so one
row's 계좌 column does not make its 연락처 column an account. key=value and JSON keys are cues too:
`to=01012345678` reads as `to 01012345678`.
"""

import re
from bisect import bisect_right
from typing import NamedTuple

_SPACES = re.compile(r" {2,}")
_SPLITTERS = (("\t", None), ("|", None), (",", None), ("  ", _SPACES))  # the runs of spaces of aligned columns
MAX_CELL = 48  # longer "cells" are sentences with commas, not a table
_RULE = re.compile(r"^\s*\|?\s*:?-{3,}")  # a Markdown table's |---|---| line
# Keys of machine text whose value is the number (the = stays a boundary for every other key): a whole ASCII
# word in any case, or the end of a Hangul one
_KEY = re.compile(r"([A-Za-z_]+|[가-힣]+)=")
PII_KEYS = frozenset((
    "tel", "phone", "mobile", "msisdn", "hp", "cell", "to", "from", "caller", "callee", "sender", "receiver", "fax",
    "contact", "rrn", "jumin", "resident_no", "residentno", "ssn", "account", "account_no", "acct", "acct_no",
    "bank_account", "bankaccount", "refund_account",
))
PII_KEYS_KO = ("연락처", "전화", "휴대폰", "계좌", "주민번호", "주민등록번호")


class Cell(NamedTuple):
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

    def cell_before(self, text: str, pos: int) -> str | None:
        """The text a cue for the number at pos is looked for in when it stands in a table's cell: its column
        header and its own cell up to pos; None outside tables."""
        if self.cells:
            i = bisect_right(self.starts, pos) - 1
            if i >= 0 and self.cells[i].start <= pos < self.cells[i].end:
                cell = self.cells[i]
                return cell.header + " " + text[cell.start:pos]
        return None

    def in_cell(self, pos: int) -> bool:
        i = bisect_right(self.starts, pos) - 1
        return i >= 0 and self.cells[i].start <= pos < self.cells[i].end


def open_keys(text: str) -> str:
    """text with the = of PII keys made a space (same length): the number after it is then a number on its own."""
    if "=" not in text:
        return text
    opened = [m.end() - 1 for m in _KEY.finditer(text)
              if m.group(1).lower() in PII_KEYS or m.group(1).endswith(PII_KEYS_KO)]
    if not opened:
        return text
    chars = list(text)
    for at in opened:
        chars[at] = " "
    return "".join(chars)


def _table_cells(text: str, commas: list[int]) -> list[Cell]:
    """The data cells of the tables in text; the positions of CSV tables' delimiting commas go into commas."""
    lines, at = [], 0
    for line in text.split("\n"):
        lines.append((at, line))
        at += len(line) + 1
    rules = [bool(_RULE.match(line)) for _, line in lines]
    cells: list[Cell] = []
    i = 0
    while i < len(lines):
        found = None
        for name, splitter in _SPLITTERS:
            n = _count(lines[i][1], name)
            if n < 2:
                continue
            j = i + 1
            while j < len(lines) and (rules[j] or _count(lines[j][1], name) == n):
                j += 1
            rows = [k for k in range(i + 1, j) if not rules[k]]
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
        if any(map(str.isdigit, lines[i][1])):
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


def _count(line: str, name: str) -> int:
    """How many cells line splits into by name (0 where it does not split)."""
    if name == "|":
        line = line.strip().strip("|")
    if name == "  ":
        return len(_SPACES.split(line)) if "  " in line.strip() else 0
    n = line.count(name)
    return n + 1 if n and line.strip() else 0


def _split(line: tuple[int, str], splitter: re.Pattern | None, name: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each cell of a line, in whole-text offsets."""
    base, text = line
    if name == "|":
        stripped = text.strip()
        lead = text.index(stripped) if stripped else 0
        if stripped.startswith("|"):
            lead += 1
        inner = stripped.strip("|")
        base, text = base + lead, inner
    out = []
    if name == "  ":
        at = 0
        for m in splitter.finditer(text):
            out.append((base + at, base + m.start(), text[at:m.start()].strip()))
            at = m.end()
        out.append((base + at, base + len(text), text[at:].strip()))
        return out
    at = base
    for part in text.split(name):
        out.append((at, at + len(part), part.strip()))
        at += len(part) + 1
    return out
