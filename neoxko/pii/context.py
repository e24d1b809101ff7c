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

from neoxko.pii.cues import compile_cues

_SPACES = re.compile(r" {2,}")
_SPLITTERS = ("\t", "|", ",", ";", "  ")  # ";": spreadsheets saved with it; "  ": aligned columns
MAX_CELL = 48  # longer "cells" are sentences with commas, not a table
# A number: what a header row never holds (column names may: 연락처1, 연락처2)
NUMBER = re.compile("[0-9]{3}")
_RULE = re.compile(r"^\s*\|?\s*:?-{3,}")  # a Markdown table's |---|---| line
# Keys of machine text whose value is the number (the = stays a boundary for every other key): a whole ASCII
# word in any case, or the end of a Hangul one
PII_KEYS = frozenset((
    "tel", "phone", "mobile", "msisdn", "hp", "cell", "to", "from", "caller", "callee", "sender", "receiver", "fax",
    "callback",
    "contact", "rrn", "jumin", "resident_no", "residentno", "ssn", "account", "account_no", "acct", "acct_no",
    "bank_account", "bankaccount", "refund_account",
))
PII_KEYS_KO = ("연락처", "전화", "휴대폰", "계좌", "주민번호", "주민등록번호")
_KEY_ENDS = frozenset(key[-1] for key in (*PII_KEYS, *map(str.upper, PII_KEYS), *PII_KEYS_KO))
# The keys read backwards from their = (an ASCII key must be the whole word before it)
_KEY_BEFORE = compile_cues([key[::-1] + "(?![A-Za-z_])" for key in sorted(PII_KEYS)]
                           + [key[::-1] for key in PII_KEYS_KO], re.IGNORECASE)


# Any key of a log or config line (value=..., a key after a space, a comma or a bracket, read backwards from its =);
# a key in a URL's query (?id=, &no=) is not opened: URL ids are not PII (POLICY.md)
_LOG_KEY = re.compile(r"[A-Za-z0-9_.-]{0,30}[A-Za-z](?:[\s,;{(\[]|$)")


class _Row(NamedTuple):
    start: int  # where the row's line starts in the text
    end: int
    line: int  # its index in Structure.lines
    name: str  # the splitter of its table
    header: list[str]  # its table's header cells


class Structure:
    """The tables of a text. Rows are found at once; a number's cell is found from the splitters before it."""

    def __init__(self, text: str):
        self.rows: list[_Row] = []
        self.lines: list[str] = []
        self.cells: dict[int, list[tuple[int, int, str]]] = {}  # aligned row line -> its cells, as asked for
        if "\n" in text.rstrip("\n"):  # (two lines at least)
            self.lines, csv = _tables(text, self.rows)
            if csv:  # a CSV cell's comma ends a number: "010-1234-5678,840..." is two values, not 5,840
                lines = self.lines.copy()
                for k in csv:
                    lines[k] = lines[k].replace(",", "\t") if '"' not in lines[k] else _unquoted_tabs(lines[k])
                text = "\n".join(lines)
        self.starts = [row.start for row in self.rows]
        self.text = text

    def _cell(self, pos: int) -> tuple[_Row, int, int, str] | None:
        """The row that pos is in, the column and start of its cell, and the row's first cell (for forms); None
        outside tables."""
        i = bisect_right(self.starts, pos) - 1
        if i < 0 or pos >= self.rows[i].end:
            return None
        row = self.rows[i]
        name = row.name
        if name == "  ":  # aligned columns: split the row once
            cells = self.cells.get(row.line)
            if cells is None:
                cells = self.cells[row.line] = _split(row.start, self.lines[row.line])
            for column, (start, end, _) in enumerate(cells):
                if start <= pos < end:
                    return row, column, start, cells[0][2]
            return None
        base, inner = row.start, self.lines[row.line]
        if name == "|":
            base, inner = _inner(base, inner)
        elif name == "," and '"' in inner:  # a quoted field's commas are its own
            at, commas = pos - base, _csv_commas(inner)
            if at < 0 or at >= len(inner) or at in commas:
                return None
            column = bisect_right(commas, at)
            first = inner[:commas[0]] if commas else inner
            return row, column, base + (commas[column - 1] + 1 if column else 0), first.strip()
        at = pos - base  # a one-character splitter: the cell is what lies between the splitters around pos
        if at < 0 or at >= len(inner) or inner[at] == name:
            return None
        split = inner.rfind(name, 0, at)
        return row, inner.count(name, 0, at), base + split + 1, inner[:inner.find(name)].strip()

    def cell_before(self, text: str, pos: int) -> str | None:
        """The text a cue for the number at pos is looked for in when it stands in a table's cell: its column
        header and its own cell up to pos; None outside tables."""
        found = self._cell(pos)
        if found is None:
            return None
        row, column, start, first = found
        header = row.header
        if not header:  # a row of a table without a header: the cells before, back to one that holds a number
            line_start = row.start + len(self.lines[row.line]) - len(self.lines[row.line].lstrip())
            before = []
            for cell in reversed(self._cells_before(row, start)):
                if any(map(str.isdigit, cell)):
                    break
                before.append(cell.strip())
            return " ".join(reversed(before)) + " " + text[max(start, line_start):pos]
        head = header[column] if column < len(header) else ""
        if len(header) == 2 and column == 1:  # a label / value form reads as a 2-column table: both count
            head += " " + first
        return head + " " + text[start:pos]

    def _cells_before(self, row: _Row, start: int) -> list[str]:
        """The cells of a row before the cell that starts at start."""
        line = self.lines[row.line]
        prefix = line[:max(start - row.start - 1, 0)]
        if row.name == "  ":
            return [cell for _, _, cell in _split(0, prefix)] if prefix.strip() else []
        if row.name == "|":
            prefix = prefix.strip().lstrip("|")
        return prefix.split(row.name) if prefix else []

    def in_cell(self, pos: int) -> bool:
        return self._cell(pos) is not None


_CELL_TAG = re.compile(r"<(/?)(?:td|th)\b[^<>\n]{0,200}>|</?tr\b[^<>\n]{0,200}>", re.IGNORECASE)


def open_html_cells(text: str) -> str:
    """text with an HTML table's cell tags made tabs and spaces (same length): <td>/<th> a tab, the others spaces,
    so a row on a line reads as a tab-separated row under its <th> header."""
    return _CELL_TAG.sub(lambda m: ("\t" if not m.group(1) and m.group()[1:3].lower() in ("td", "th") else " ")
                         + " " * (len(m.group()) - 1), text)


def open_keys(text: str) -> str:
    """text with the = of PII keys and log keys made a space (same length): the number after it is then a number on
    its own."""
    at = text.find("=")
    if at < 0:
        return text
    backwards, opened = text[::-1], []
    while at > 0:
        if text[at - 1] in _KEY_ENDS and _KEY_BEFORE.match(backwards, len(text) - at) \
                or _LOG_KEY.match(backwards, len(text) - at):
            opened.append(at)
        at = text.find("=", at + 1)
    if not opened:
        return text
    parts, last = [], 0
    for at in opened:
        parts += [text[last:at], " "]
        last = at + 1
    return "".join(parts) + text[last:]


def _tables(text: str, rows: list[_Row]) -> tuple[list[str], list[int]]:
    """The lines of text and the indexes of the lines of CSV tables; each table's data rows go into rows."""
    lines = text.split("\n")
    count = len(lines)
    rules = [bool("---" in line and _RULE.match(line)) for line in lines] if "---" in text else [False] * count
    csv: list[int] = []
    i = at = 0  # a line and where it starts
    while i < count:
        found, line = None, lines[i]
        if "\t" not in line and "|" not in line and "," not in line and ";" not in line and "  " not in line:
            i += 1  # (most lines)
            at += len(line) + 1
            continue
        for name in _SPLITTERS:
            if name not in line:
                continue
            head = cells(line, name)
            n = len(head)
            if n < 2:
                continue
            j, split = i + 1, {i: head}  # (each line is split once)
            if name == "\t" or name == "," and '"' not in text:  # (the common tables, counted inline)
                while j < count and (rules[j] or lines[j].count(name) == n - 1 and lines[j].strip()):
                    j += 1
            else:
                while j < count and (rules[j] or len(split.setdefault(j, cells(lines[j], name))) == n):
                    j += 1
            # (a line no longer than MAX_CELL has no longer cell)
            if j > i + 1 and not all(rules[i + 1:j]) and all(
                    len(c.strip()) <= MAX_CELL for k in range(i, j)
                    if len(lines[k]) > MAX_CELL and (k == i or not rules[k])
                    for c in (split[k] if k in split else cells(lines[k], name))):
                found = (name, j, head)
                break
        if found is None:
            i += 1
            at += len(line) + 1
            continue
        name, j, head = found
        at += len(line) + 1
        new = tuple.__new__  # (a NamedTuple's own constructor costs more than the rest of a row's handling)
        if NUMBER.search(line):  # no header row (or a form whose first line holds a value): each number
            at -= len(line) + 1            # is read after the cells before it in its row, back to one with digits
            first = i
            header: list[str] = []
        else:
            first, header = i + 1, [cell.strip() for cell in head]
            while first < j and (rules[first] or not NUMBER.search(lines[first])):  # a second header row
                if not rules[first]:  # (a spreadsheet's merged group row above its column names, or below them)
                    more = split[first] if first in split else cells(lines[first], name)
                    header = [f"{a} {b.strip()}".strip() for a, b in zip(header, more, strict=False)]
                    at += len(lines[first]) + 1
                    first += 1
                else:
                    break
        for k in range(first, j):
            end = at + len(lines[k])
            if not rules[k]:
                rows.append(new(_Row, (at, end, k, name, header)))
            at = end + 1
        if name == ",":
            csv.extend(k for k in range(i, j) if k == i or not rules[k])
        i = j
    return lines, csv


def cells(line: str, name: str) -> list[str]:
    """The cells of a line split by name, not stripped; none where it does not split."""
    if name == "  ":
        return _SPACES.split(line) if "  " in line.strip() else []
    if name == "|":
        line = line.strip().strip("|")
    elif name == "," and '"' in line:  # RFC 4180: a field in double quotes may hold commas
        commas = _csv_commas(line)
        if not commas or not line.strip():
            return []
        return [line[a + 1:b] for a, b in zip([-1, *commas], [*commas, len(line)], strict=True)]
    return line.split(name) if name in line and line.strip() else []


def _csv_commas(line: str) -> list[int]:
    """Where the commas that separate a CSV line's fields are (not those inside a quoted field)."""
    commas, quoted = [], False
    for at, char in enumerate(line):
        if char == '"':
            quoted = not quoted  # ("" inside a quoted field turns it off and on again)
        elif char == "," and not quoted:
            commas.append(at)
    return commas


def _unquoted_tabs(line: str) -> str:
    """A CSV line with its separating commas made tabs (the same length)."""
    chars = list(line)
    for at in _csv_commas(line):
        chars[at] = "\t"
    return "".join(chars)


def _inner(base: int, line: str) -> tuple[int, str]:
    """Where a Markdown row's cells start, and the row without its outer pipes."""
    stripped = line.strip()
    lead = line.index(stripped) if stripped else 0
    if stripped.startswith("|"):
        lead += 1
    return base + lead, stripped.strip("|")


def _split(base: int, line: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each cell of a line of aligned columns that starts at base."""
    out, at = [], 0
    for m in _SPACES.finditer(line):
        out.append((base + at, base + m.start(), line[at:m.start()].strip()))
        at = m.end()
    out.append((base + at, base + len(line), line[at:].strip()))
    return out
