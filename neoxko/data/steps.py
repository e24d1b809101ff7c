"""neoxko's own datatrove steps: the Korean-specific reading, cleaning, filtering, PII and decontamination."""

import gzip
import html
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger
from datatrove.utils.word_tokenizers import WordTokenizer

from neoxko.pii.documents import TABLE_SUFFIXES, TableState
from neoxko.pii.replace import replace_pii_counted

PII_CONTEXT = "pii_context"  # metadata: the header line a document continues (a table's later rows), for ReplacePII


class KoreanTextReader(BaseDiskReader):
    """Reads .txt (a document a line), .csv, .tsv and .md (a document a file), .jsonl and .jsonl.gz (a text
    field), and .parquet files.

    Lines that are not valid UTF-8 or not valid JSON are counted (invalid_utf8, bad_json) and
    logged with file and line, never crash the run; files that cannot be opened or parsed (a damaged
    .parquet) are counted too (unreadable_files). Documents over MAX_CHARS characters are skipped and
    counted (too_long): the cleaning and PII steps would need hundreds of times their size in memory.
    """

    name = "📖 Korean text"
    MAX_CHARS = 1_000_000  # the longest document of the shared corpus (a law) has 276,450

    def read_file(self, filepath: str) -> DocumentsPipeline:
        try:
            if filepath.endswith(".parquet"):
                yield from self._read_parquet(filepath)
                return
            with self.data_folder.open(filepath, "rb") as f:
                raw = gzip.open(f) if filepath.endswith(".gz") else f
                yield from self._read_lines(filepath, raw)
        except (OSError, EOFError, gzip.BadGzipFile, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid
            self.stat_update("unreadable_files")
            logger.warning(f"skipping unreadable file {filepath}: {e}")

    def _fits(self, text: str, where: str) -> bool:
        if len(text) <= self.MAX_CHARS:
            return True
        self.stat_update("too_long")
        logger.warning(f"{where}: a document of {len(text):,} characters (over {self.MAX_CHARS:,}); skipped")
        return False

    def _decoded(self, filepath: str, raw: Iterable[bytes]) -> Iterator[tuple[int, bytes, str]]:
        """(line number, bytes, text) of each line that is UTF-8; the others are counted and logged."""
        for n, line in enumerate(raw, 1):
            try:
                yield n, line, line.decode("utf-8")
            except UnicodeDecodeError as e:
                self.stat_update("invalid_utf8")
                logger.warning(f"{filepath}:{n}: not UTF-8 ({e.reason} at byte {e.start}); line skipped")

    def _read_lines(self, filepath: str, raw: Iterable[bytes]) -> DocumentsPipeline:
        if filepath.lower().endswith(TABLE_SUFFIXES):
            yield from self._read_table(filepath, raw)
            return
        is_json = ".jsonl" in filepath or ".json" in filepath
        table = TableState()  # a .txt row of a table is read for PII after its header line
        for n, line, text in self._decoded(filepath, raw):
            if is_json:
                try:
                    data = json.loads(text)
                    if not isinstance(data[self.text_key], str):
                        raise TypeError
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.stat_update("bad_json")
                    logger.warning(f"{filepath}:{n}: not a JSON object with a {self.text_key!r} field; skipped")
                    continue
            else:
                data = {self.text_key: text.rstrip("\r\n")}
                if header := table.context(text):
                    data[PII_CONTEXT] = header
            if not self._fits(data[self.text_key], f"{filepath}:{n}"):
                continue
            document = self.get_document_from_dict(data, filepath, n - 1)
            if document:
                self.stat_update("bytes_read", value=len(line))
                yield document

    def _read_table(self, filepath: str, raw: Iterable[bytes]) -> DocumentsPipeline:
        """A CSV, TSV or Markdown file is one document (pieces of at most MAX_CHARS, cut between lines, where it
        is longer; the later pieces are read for PII after the file's header line)."""
        piece: list[str] = []
        header, size, n_piece = None, 0, 0

        def document():
            data = {self.text_key: "".join(piece).rstrip("\r\n")}
            if n_piece and header:
                data[PII_CONTEXT] = header
            return self.get_document_from_dict(data, filepath, n_piece)

        for _, line, text in self._decoded(filepath, raw):
            if header is None:
                header = text.rstrip("\r\n")
            if size + len(text) > self.MAX_CHARS and piece:
                if doc := document():
                    yield doc
                piece, size, n_piece = [], 0, n_piece + 1
            piece.append(text)
            size += len(text)
            self.stat_update("bytes_read", value=len(line))
        if piece and (doc := document()):
            yield doc

    def _read_parquet(self, filepath: str) -> DocumentsPipeline:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from None
        with self.data_folder.open(filepath, "rb") as f:
            n = 0
            for batch in pq.ParquetFile(f).iter_batches(columns=None):
                for row in batch.to_pylist():
                    n += 1
                    if not self._fits(str(row.get(self.text_key) or ""), f"{filepath} row {n}"):
                        continue
                    document = self.get_document_from_dict(row, filepath, n - 1)
                    if document:
                        self.stat_update("bytes_read", value=len(document.text.encode()))
                        yield document


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff\ufffe]")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]{0,300})?/?>")
_ENTITY = re.compile(r"&(?:[A-Za-z]{2,8}|#[0-9]{1,6}|#x[0-9A-Fa-f]{1,6});")
# Table cells stay apart: a tab run stays one tab, a cell or line tag becomes a space (joined cells would make two
# numbers one, which hides both from the PII step)
_BLOCK_TAG = re.compile(r"</?(?:td|th|tr|br|p|div|li|dt|dd|table|thead|tbody|ul|ol|h[1-6])(?:\s[^<>]{0,300})?/?>",
                        re.IGNORECASE)
_TABS = re.compile(r"[ \u00a0\u3000]*\t[ \t\u00a0\u3000]*")
_SPACES = re.compile(r"[ \u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def clean_text(text: str) -> str:
    """NFC, no control characters, no HTML tags or entities, single spaces and tabs, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if "<" in text:
        text = _TAG.sub("", _BLOCK_TAG.sub(" ", text))
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    text = _CONTROL.sub("", text)
    if "\t" in text:
        text = _TABS.sub("\t", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip(" ") for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


class CleanKorean(PipelineStep):
    """Unicode NFC, control characters, broken markup and whitespace; empty results are dropped."""

    name = "🧽 Korean clean"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            before = len(doc.text.encode())
            with self.track_time():
                doc.text = clean_text(doc.text)
            self.stat_update("bytes_in", value=before)
            if not doc.text:
                self.stat_update("dropped_empty")
                continue
            self.stat_update("bytes_out", value=len(doc.text.encode()))
            self.stat_update("forwarded")
            yield doc


class KoreanQualityFilter(BaseFilter):
    """Drops documents that are too short, not mostly Korean, repetitive or mostly symbols.

    Thresholds (defaults, each with its drop reason in the stats):
    - too_short: fewer than min_chars non-space characters (10: a short review still passes);
    - low_hangul: Hangul is under min_hangul_share of the letters (0.5; Latin and Hanja count as letters);
    - repetitive: over max_dup_line_share of the characters sit in lines that occur more than once
      (0.3, Gopher's value), or over max_char_run_share in runs of 5+ equal characters (0.3: ㅋㅋㅋㅋㅋ);
    - symbols: characters other than letters, digits, spaces and plain punctuation (.,!?'"()~-·…%:;/[])
      exceed max_symbol_share of the non-space characters (0.2): emoji, ★, ♥, box drawing.
    """

    name = "🇰🇷 Korean quality"

    def __init__(self, min_chars: int = 10, min_hangul_share: float = 0.5, max_dup_line_share: float = 0.3,
                 max_char_run_share: float = 0.3, max_symbol_share: float = 0.2, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_chars = min_chars
        self.min_hangul_share = min_hangul_share
        self.max_dup_line_share = max_dup_line_share
        self.max_char_run_share = max_char_run_share
        self.max_symbol_share = max_symbol_share

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        n_chars = len(text) - len(_SPACE.findall(text))
        if n_chars < self.min_chars:
            return False, "too_short"
        n_letters = len(_LETTER.findall(text))
        if not n_letters or len(_HANGUL.findall(text)) < self.min_hangul_share * n_letters:
            return False, "low_hangul"
        if duplicate_line_share(text) > self.max_dup_line_share or char_run_share(text) > self.max_char_run_share:
            return False, "repetitive"
        if len(_SYMBOL.findall(text)) > self.max_symbol_share * n_chars:
            return False, "symbols"
        return True


# Counted with regular expressions (C speed) rather than per-character Python calls.
_SPACE = re.compile(r"\s")
_LETTER = re.compile(r"[^\W\d_]")  # any Unicode letter
_HANGUL = re.compile(r"[\uac00-\ud7a3\u3131-\u318e\u1100-\u11ff]")
# Not a letter, digit, space or plain punctuation: emoji, dingbats, box drawing, ★, ♥, ...
_SYMBOL = re.compile(r"[^\w\s.,!?'\"()~\-·…%:;/\[\]]|_")


def duplicate_line_share(text: str) -> float:
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    duplicated = sum(len(line) * n for line, n in counts.items() if n > 1)
    return duplicated / max(sum(map(len, lines)), 1)


_CHAR_RUN = re.compile(r"(\S)\1{4,}")


def char_run_share(text: str) -> float:
    return sum(len(m.group()) for m in _CHAR_RUN.finditer(text)) / max(len(text), 1)


class ReplacePII(PipelineStep):
    """Replaces resident registration, phone and bank account numbers with <|rrn|>, <|tel|>, <|acc|>."""

    name = "🔒 PII"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                doc.text, counts = replace_pii_counted(doc.text, doc.metadata.pop(PII_CONTEXT, ""))
            for label, n in counts.items():
                self.stat_update(f"pii_{label}", value=n)
            self.stat_update("documents_with_pii", value=int(bool(counts)))
            yield doc


_NORMALISE = re.compile(r"[\W_]+")


def normalise_for_overlap(text: str) -> str:
    """Lowercase letters and digits only: spacing and punctuation changes do not hide an overlap."""
    return _NORMALISE.sub("", text.lower())


class KobestDecontamination(BaseFilter):
    """Drops documents that share a long span with a KoBEST test example, and reports each match.

    Texts are compared after normalise_for_overlap, as character n-grams (n = 25 characters, about
    seven Korean words). Every n-gram of the test texts is indexed; documents are probed every
    `stride` characters, which finds every shared span of n + stride - 1 characters or more. Test
    texts shorter than n (one-line SentiNeg sentences, COPA premises) are not indexed: an exact
    match of so short a phrase is no evidence of contamination. Matches go to report_folder as JSONL.
    """

    name = "🧪 KoBEST decontamination"

    def __init__(self, test_texts: dict[str, list[str]], report_folder: str, n: int = 25, stride: int = 8):
        super().__init__()
        self.n, self.stride = n, stride
        self.report_folder = report_folder
        self.index: dict[str, str] = {}
        for task, texts in test_texts.items():
            for text in texts:
                norm = normalise_for_overlap(text)
                for i in range(len(norm) - n + 1):
                    self.index.setdefault(norm[i:i + n], task)
        self._report = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        norm = normalise_for_overlap(doc.text)
        for i in range(0, len(norm) - self.n + 1, self.stride):
            task = self.index.get(norm[i:i + self.n])
            if task is not None:
                self.stat_update(f"matched_{task}")
                if self._report is not None:  # open while run() runs
                    self._report.write(json.dumps({"id": doc.id, "task": task, "ngram": norm[i:i + self.n],
                                               "source": doc.metadata.get("file_path")}, ensure_ascii=False) + "\n")
                return False, "kobest_overlap"
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.report_folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{rank:05d}.jsonl", "w", encoding="utf-8") as self._report:
            yield from super().run(data, rank, world_size)
        self._report = None


def kobest_test_texts(data_dir: str | Path) -> dict[str, list[str]]:
    """The texts of the KoBEST test splits (skt/kobest_v1 layout) that a model is asked about."""
    fields = {"boolq": ["paragraph", "question"], "copa": ["premise", "alternative_1", "alternative_2"],
              "wic": ["context_1", "context_2"], "hellaswag": ["context", "ending_1", "ending_2", "ending_3",
                                                                "ending_4"], "sentineg": ["sentence"]}
    texts: dict[str, list[str]] = {}
    for task, keys in fields.items():
        path = Path(data_dir) / task / "test.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --kobest-dir needs the skt/kobest_v1 layout")
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        texts[f"kobest_{task}"] = [str(row[k]) for row in rows for k in keys if row.get(k)]
    return texts


_WORDS = re.compile(r"[가-힣ㄱ-ㅎㅏ-ㅣ\u1100-\u11ff]+|[A-Za-z]+|[0-9]+|[^\s\w]")
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")


class KoreanWordTokenizer(WordTokenizer):
    """Eojeol-level words for MinHash shingles: Hangul, Latin and digit runs, and single symbols.

    datatrove's Korean tokenizer needs kiwipiepy and a morphological model; near-duplicate detection
    needs only stable word boundaries, which whitespace and script changes give.
    """

    def word_tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in _SENTENCE_END.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if text[start:m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans


class HoldOut(PipelineStep):
    """Sends a fixed share of documents to a held-out set: tokenized shards (and JSONL) of their own.

    A document is held out when the xxhash of its id falls in the lowest `fraction` of the range,
    so the split does not depend on task count or order and is the same on every rerun. The rest
    pass downstream. Held-out documents come after deduplication, so none has a copy in training.
    """

    name = "🔒 Held-out split"

    def __init__(self, fraction: float, output_folder: str, tokenizer: str, eos_token: str = "<|endoftext|>"):
        super().__init__()
        if not 0 < fraction < 1:
            raise ValueError(f"held-out fraction must be between 0 and 1, got {fraction}")
        self.threshold = int(fraction * 2**64)
        self.output_folder, self.tokenizer, self.eos_token = output_folder, tokenizer, eos_token

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import xxhash
        from datatrove.pipeline.tokens import DocumentTokenizer
        from datatrove.pipeline.writers import JsonlWriter

        held = []
        for doc in data:
            if xxhash.xxh64_intdigest(str(doc.id)) < self.threshold:  # JSONL ids may be numbers
                held.append(doc)
                self.stat_update("heldout_documents")
            else:
                yield doc
        folder = Path(self.output_folder)
        writer = JsonlWriter(str(folder / "documents"), compression=None)
        tokenizer = DocumentTokenizer(str(folder / "tokens"), self.tokenizer, eos_token=self.eos_token,
                                      shuffle_documents=False, save_final_metadata=True)
        for _ in tokenizer.run(writer.run(iter(held), rank, world_size), rank, world_size) or ():
            pass
        self.stat_update("heldout_tokens", value=int(tokenizer.stats["tokens"].total) if held else 0)
