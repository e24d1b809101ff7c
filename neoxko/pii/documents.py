"""Files as the replacer's documents: a header governs its rows, however the file is read.

A number's cue is often not beside it: the 휴대폰 of a CSV header is lines above the rows it names, the bank of
a letter a line above its account. So text is masked a document at a time, and a document is what the file
says one is:

- `file` (CSV, TSV, Markdown): the whole file, read in pieces of at most PIECE characters cut between lines;
  each later piece is read after the file's first line, its header;
- `blocks`: blank-line-separated blocks (a letter, a form, a table with its header);
- `lines` (a document a line, as corpora are written): each line alone, but a line that splits into cells
  like the header line above it is a row of that header's table and is read after it;
- `jsonl`: a JSON record a line; its string leaves are one document of `key: value` lines, so a key or a
  sibling field (the bank beside the number) is a cue, and the record is written back with its leaves masked;
- `json`: a whole JSON file (an array of records), its leaves read the same way.

Every function yields (masked text, counts) per unit read and holds at most one piece in memory.
"""

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from neoxko.pii.context import NUMBER, cells
from neoxko.pii.replace import Span, apply_spans, find_pii, replace_pii_counted

PIECE = 1 << 20  # characters of a file or block masked at once
TABLE_SUFFIXES = (".csv", ".tsv", ".md", ".markdown")
_HEADER_SPLITTERS = ("\t", "|", ",", ";")


def mode_for(name: str, head: str) -> str:
    """The document mode of a file by its name, or by its first kilobytes (head) where the name says nothing."""
    lower = name.lower().removesuffix(".gz")
    if lower.endswith(TABLE_SUFFIXES):
        return "file"
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith(".json"):  # one JSON value, or JSON lines under the wrong name
        return "json" if head.lstrip()[:1] in ("[", "{") and not _one_value_a_line(head) else "jsonl"
    return "blocks" if "\n\n" in head.replace("\r\n", "\n") else "lines"


def _one_value_a_line(head: str) -> bool:
    """Whether the first line of head is a JSON value of its own (JSON lines)."""
    try:
        json.loads(head.split("\n", 1)[0])
        return True
    except ValueError:
        return False


def mask_json(text: str) -> tuple[str, Counter]:
    """A whole JSON file (an array of records, an object) masked as mask_record masks a record; written back as
    it was where it holds no PII, else indented as it was (2 spaces where it had line breaks) or compact."""
    value, counts = mask_record(json.loads(text))
    if not counts:
        return text, counts
    indent = 2 if "\n" in text.strip() else None
    return json.dumps(value, ensure_ascii=False, indent=indent) + ("\n" if text.endswith("\n") else ""), counts


def mask_file(lines: Iterable[str]) -> Iterator[tuple[str, Counter]]:
    """The whole input as one document, in pieces cut between lines; the first line is every later piece's
    context (a CSV's header)."""
    yield from _pieces(lines, blocks=False)


def mask_blocks(lines: Iterable[str]) -> Iterator[tuple[str, Counter]]:
    """Each blank-line-separated block as one document (a block longer than PIECE is read in pieces, each later
    one after the block's first line); blank lines come back as they were."""
    yield from _pieces(lines, blocks=True)


def _pieces(lines: Iterable[str], blocks: bool) -> Iterator[tuple[str, Counter]]:
    piece: list[str] = []
    first, size, continued = "", 0, False
    for line in lines:
        if blocks and not line.strip():
            if piece:
                yield replace_pii_counted("".join(piece), first if continued else "")
            piece, size, continued = [], 0, False
            yield line, Counter()
            continue
        if not piece and not continued:
            first = line.rstrip("\r\n")
        piece.append(line)
        size += len(line)
        if size >= PIECE:
            yield replace_pii_counted("".join(piece), first if continued else "")
            piece, size, continued = [], 0, True
    if piece:
        yield replace_pii_counted("".join(piece), first if continued else "")


def mask_lines(lines: Iterable[str]) -> Iterator[tuple[str, Counter]]:
    """Each line alone, a table's rows after their header line."""
    table = TableState()
    for line in lines:
        yield replace_pii_counted(line, table.context(line))


class TableState:
    """Which table, if any, a stream of lines is in: context(line) is the header line that governs the line ("" if
    none). A header is a line of two or more cells (tab, |, comma or semicolon separated) without a number; the
    lines after it that split into as many cells the same way are its rows, a Markdown |---| rule among them."""

    def __init__(self):
        self.header, self.splitter, self.cells, self.rows = "", "", 0, 0

    def context(self, line: str) -> str:
        text = line.rstrip("\r\n")
        number = NUMBER.search(text) is not None  # (column names may hold a digit: 연락처1)
        if self.header:
            if self._is_row(text):
                if not number and not self.rows:  # a second header row (a spreadsheet's), or a Markdown rule
                    self.header += "\n" + text
                    return ""
                self.rows += 1
                return self.header
            self.header = ""
        if text and not number:
            for splitter in _HEADER_SPLITTERS:
                if splitter in text and len(found := cells(text, splitter)) >= 2:
                    self.header, self.splitter, self.cells, self.rows = text, splitter, len(found), 0
                    break
        return ""

    def _is_row(self, text: str) -> bool:
        if self.splitter == "|" and text.strip().startswith("|") and set(text.strip()) <= set("|-: "):
            return True  # a Markdown rule line
        return self.splitter in text and len(cells(text, self.splitter)) == self.cells


def mask_record(record: Any) -> tuple[Any, Counter]:
    """A JSON value with every string (and integer) leaf masked, the leaves read as one document of `key: value`
    lines in order, so keys and sibling fields are cues."""
    leaves: list[tuple[Any, Any, str, int]] = []  # (container, key, leaf text, where it starts in the document)
    lines: list[str] = []
    at = 0

    def walk(value: Any, path: str, container: Any, key: Any) -> None:
        nonlocal at
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k), value, k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, path, value, i)
        elif isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
            prefix = f"{path}: "
            leaves.append((container, key, text, at + len(prefix)))
            lines.append(prefix + text)
            at += len(prefix) + len(text) + 1

    holder = [record]
    walk(record, "", holder, 0)
    if not leaves:
        return record, Counter()
    spans = find_pii("\n".join(lines))
    total: Counter = Counter()
    k = 0
    for container, key, text, start in leaves:
        inside: list[Span] = []
        while k < len(spans) and spans[k].start < start + len(text):
            s = spans[k]
            if s.end > start:  # (a span in the key part is not the leaf's)
                inside.append(Span(max(s.start, start) - start, min(s.end, start + len(text)) - start, s.label))
            k += 1
        if inside:
            container[key], counts = apply_spans(text, inside)
            total.update(counts)
    return holder[0], total
