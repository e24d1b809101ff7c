"""`neoxko data pii | pii-eval | pii-generate`: replace PII in files, score the replacer, write labelled sets."""

import argparse
import codecs
import contextlib
import gzip
import itertools
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from neoxko.errors import NeoxkoError


def add_pii_commands(data_commands) -> None:
    pii = data_commands.add_parser("pii", help="replace PII in text, CSV/TSV/Markdown or JSONL files")
    pii.add_argument("input", nargs="?", default="-", help="the file (.gz too); - is stdin")
    pii.add_argument("--output", default="-", help="where to write (.gz to compress); - is stdout. The same path "
                                                   "as the input replaces it once the whole file is done")
    pii.add_argument("--text-key", default=None, help="JSONL field to clean (default: every string of a record)")
    pii.add_argument("--documents", choices=("auto", "file", "blocks", "lines", "jsonl", "json"), default="auto",
                     help="what one document is, so that a header governs its rows: the whole file (auto for .csv, "
                          ".tsv, .md), blank-line-separated blocks (auto for text with blank lines), each line with "
                          "table headers carried to their rows (auto for other text), a JSON record (.jsonl), a whole "
                          "JSON file (.json)")
    pii.add_argument("--encoding", default="auto",
                     help="the input's encoding: auto (UTF-8, or cp949 where the first lines are cp949 and not UTF-8, "
                          "as files from older Korean Windows programs are), or any Python codec; the output is UTF-8")
    pii.set_defaults(run=run_pii)
    pii_eval = data_commands.add_parser("pii-eval", help="score the PII replacer on a labelled JSONL set")
    pii_eval.add_argument("labelled", nargs="?", default=None,
                          help='JSONL of {"text": ..., "spans": [{"start", "end", "label"}]}; none: the sets that '
                               "come with neoxko (real text, both generators)")
    pii_eval.add_argument("--errors", action="store_true", help="print every line the replacer gets wrong")
    pii_eval.add_argument("--by-kind", action="store_true", help="with the built-in sets: a table per set by kind")
    pii_eval.set_defaults(run=run_pii_eval)
    pii_gen = data_commands.add_parser("pii-generate",
                                       help="write a seeded, labelled PII set (every format x every context kind)")
    pii_gen.add_argument("--seed", type=int, default=0, help="tune on one seed, report on another")
    pii_gen.add_argument("--lines", type=int, default=3000)
    pii_gen.add_argument("--negative-share", type=float, default=0.45, help="share of lines with only hard negatives")
    pii_gen.add_argument("--output", required=True, help="JSONL file to write")
    pii_gen.set_defaults(run=run_pii_generate)


def run_pii(args: argparse.Namespace) -> int:
    from neoxko.pii import documents

    if args.encoding != "auto":
        try:
            codecs.lookup(args.encoding)
        except LookupError:
            raise NeoxkoError(f"unknown --encoding {args.encoding!r}; for Korean files try cp949 or euc-kr") from None
    totals: Counter = Counter()
    invalid = 0
    with contextlib.ExitStack() as stack:
        source = sys.stdin.buffer if args.input == "-" else stack.enter_context(_open_input(args.input))
        sink = sys.stdout.buffer if args.output == "-" else stack.enter_context(_Output(args.output))
        head_bytes = list(itertools.islice(source, 2000))
        encoding = _encoding(args, head_bytes)
        size = None if args.input == "-" or args.input.endswith(".gz") else os.path.getsize(args.input)
        progress = stack.enter_context(tqdm(total=size, unit="B", unit_scale=True, desc="PII", disable=None,
                                            file=sys.stderr))  # (shown on a terminal only)

        def lines():
            nonlocal invalid
            for raw in itertools.chain(head_bytes, source):
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError:  # its bytes pass through untouched (surrogateescape), counted
                    line = raw.decode(encoding, errors="surrogateescape")
                    invalid += 1
                progress.update(len(raw))
                yield line

        stream = lines()
        mode = args.documents
        if args.text_key is not None:
            mode = "jsonl"
        elif mode == "auto":
            head = list(itertools.islice(stream, 2000))  # (the first lines tell blank-line blocks from lines)
            mode = documents.mode_for(args.input, "".join(head)[:65536])
            stream = itertools.chain(head, stream)
        if mode == "jsonl":
            masked = _pii_records(stream, args)
        elif mode == "json":
            masked = [_pii_json("".join(stream), args)]
        else:
            masked = {"file": documents.mask_file, "blocks": documents.mask_blocks,
                      "lines": documents.mask_lines}[mode](stream)
        for text, counts in masked:
            sink.write(text.encode("utf-8", errors="surrogateescape"))
            totals.update(counts)
    summary = ", ".join(f"{k} {totals[k]}" for k in ("rrn", "tel", "acc"))
    print(f"replaced: {summary} (documents: {mode})", file=sys.stderr)
    if invalid:
        print(f"neoxko: {invalid} line(s) are not {encoding}: their bytes passed through as they were, and "
              f"numbers in them were masked, but their words were not read as cues (계좌, 은행, a header). If the "
              f"file is from a Korean Windows program, run again with --encoding cp949", file=sys.stderr)
    return 0


def _pii_records(lines, args: argparse.Namespace):
    """JSONL: the --text-key field of each record as one document, or else every string leaf of the record. A
    record without PII is written back as it was read."""
    from neoxko.pii.documents import mask_record
    from neoxko.pii.replace import replace_pii_counted

    for n, line in enumerate(lines, 1):
        if not line.strip():
            yield line, {}
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NeoxkoError(f"{args.input}:{n}: not a JSON record ({e.msg}); use --documents lines for plain "
                              f"text") from None
        if args.text_key is None:
            row, counts = mask_record(row)
        elif not isinstance(row, dict) or not isinstance(row.get(args.text_key), str):
            raise NeoxkoError(f"{args.input}:{n}: the record has no {args.text_key!r} text field; fix the record, "
                              f"or leave --text-key out to mask every field of every record")
        else:
            row[args.text_key], counts = replace_pii_counted(row[args.text_key])
        yield (json.dumps(row, ensure_ascii=False) + "\n" if counts else line), counts


def _encoding(args: argparse.Namespace, head: list[bytes]) -> str:
    """--encoding, or for auto: UTF-8, unless the first lines are not UTF-8 and are cp949 (then it says so)."""
    if args.encoding != "auto":
        return args.encoding
    data = b"".join(head)
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        data.decode("cp949")
    except UnicodeDecodeError:
        return "utf-8"  # (neither: the undecodable lines are counted and reported)
    print(f"neoxko: reading {args.input} as cp949 (its first lines are not UTF-8; --encoding sets it)",
          file=sys.stderr)
    return "cp949"


def _pii_json(text: str, args: argparse.Namespace):
    from neoxko.pii.documents import mask_json

    try:
        return mask_json(text)
    except json.JSONDecodeError as e:
        raise NeoxkoError(f"{args.input}:{e.lineno}:{e.colno}: not JSON ({e.msg}); use --documents jsonl for JSON "
                          f"lines or --documents lines for text") from None


def _open_input(path: str):
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise NeoxkoError(f"cannot open {path}: {e.strerror}") from None


class _Output:
    """The output file, written beside it and moved into place only when the whole input is done: a failed run
    leaves no half file, and --output may be the input itself."""

    def __init__(self, path: str):
        self.path = Path(path)
        try:
            fd, self.partial = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        except OSError as e:
            raise NeoxkoError(f"cannot write {path}: {e.strerror}") from None
        self.file = os.fdopen(fd, "wb")
        self.sink = gzip.GzipFile(fileobj=self.file, mode="wb") if path.endswith(".gz") else self.file

    def __enter__(self):
        return self.sink

    def __exit__(self, kind, *_):
        if self.sink is not self.file:
            self.sink.close()
        self.file.close()
        if kind is None:
            if self.path.exists():
                os.chmod(self.partial, self.path.stat().st_mode & 0o777)
            os.replace(self.partial, self.path)
        else:
            os.unlink(self.partial)
        return False


def run_pii_generate(args: argparse.Namespace) -> int:
    from neoxko.pii.synth import generate, write

    if args.lines < 1 or not 0 <= args.negative_share <= 1:
        raise NeoxkoError("--lines must be at least 1 and --negative-share between 0 and 1")
    records = generate(args.seed, args.lines, args.negative_share)
    path = write(args.output, records)
    negative = sum(not r["spans"] for r in records)
    print(f"neoxko: wrote {len(records)} labelled lines to {path} ({negative / len(records):.0%} without PII, "
          f"seed {args.seed})", file=sys.stderr)
    return 0


def run_pii_eval(args: argparse.Namespace) -> int:
    from neoxko.pii.score import errors, kind_table, read_kinds, read_labelled, score

    if args.labelled is None:
        from neoxko.pii.score import builtin_sets, summary_table

        sets = builtin_sets()
        print(summary_table(sets))
        for name, (items, kinds) in sets.items():
            if args.by_kind:
                print(f"\n{name}, by kind (strict):\n" + kind_table(items, kinds))
            if args.errors and "held-out" not in name:  # (the held-out half is for reporting, never for reading)
                print(f"\n{name}, errors:\n" + "\n".join(errors(items)))
        return 0
    items = read_labelled(args.labelled)
    print(score(items).table())
    kinds = read_kinds(args.labelled)
    if set(kinds) != {"-"}:
        print("\nby context kind (strict):\n" + kind_table(items, kinds))
    if args.errors:
        print("\n".join(errors(items)))
    return 0
