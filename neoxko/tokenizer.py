"""The byte-level BPE tokenizer: training and loading tokenizer.json with the `tokenizers` library."""

import json
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from neoxko.errors import CheckpointError
from neoxko.formats.locate import adapter_base, resolve

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

# The released Polyglot-Ko layout: ids 0-3 inside the 30,000 BPE entries, the PII tokens added after
# them (30000-30002); the embedding is padded to 30,080 rows.
EOS, SEP = "<|endoftext|>", "<|sep|>"
PII_TOKENS = {"acc": "<|acc|>", "tel": "<|tel|>", "rrn": "<|rrn|>"}
LEADING_SPECIALS = ["<|unused0|>", "<|unused1|>", EOS, SEP]
# The model card writes the phone token <|tell|>; the release spells it <|tel|>. Both mean the same.
ALIASES = {"<|tell|>": "<|tel|>"}


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: HFTokenizer, eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.source: Path | None = None  # the folder it was read from, whose files save_model copies
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token is not None else None
        self.aliases = {a: t for a, t in ALIASES.items()
                        if tokenizer.token_to_id(t) is not None and tokenizer.token_to_id(a) is None}

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(
                f"{folder} has no tokenizer.json; save the model with neoxko.save_model(model, folder, "
                "tokenizer=...) or copy the tokenizer's files (tokenizer.json, tokenizer_config.json) into it"
            )
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise CheckpointError(f"{file} is not a valid tokenizer.json: {e}") from None
        loaded = cls(tokenizer, _eos_token(folder, tokenizer))
        loaded.source = folder
        return loaded

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(_apply_aliases(text, self.aliases), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel threads (the `tokenizers` Rust pool)."""
        texts = [_apply_aliases(t, self.aliases) for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def decode_stream(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Turns token ids into text pieces one at a time, never splitting a UTF-8 character.

    Byte-level BPE can cut a Hangul syllable (3 bytes) across tokens: text is held back while its
    decoding ends in an incomplete character (U+FFFD), and the piece that completes it carries the
    whole syllable. Only the ids since the last emitted piece are decoded, so each step is O(1).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """What is still held back (bytes that never formed a character), at the end of a stream."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


def load_tokenizer(path_or_id: str | Path) -> Tokenizer:
    """Load tokenizer.json (and the eos token from tokenizer_config.json) from a folder or hub id; a LoRA adapter
    folder without a tokenizer of its own takes its base model's."""
    folder = resolve(path_or_id, allow_patterns=TOKENIZER_FILES + ["adapter_config.json"])
    if not (folder / "tokenizer.json").is_file() and (base := adapter_base(folder)) is not None:
        folder = base
    return Tokenizer.from_dir(folder)


def _eos_token(folder: Path, tokenizer: HFTokenizer) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{file} is not a valid JSON object: {e}") from None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None:
            if tokenizer.token_to_id(eos) is None:
                raise CheckpointError(f"{file} names eos_token {eos!r}, which tokenizer.json does not have")
            return eos
    return "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else None


def _apply_aliases(text: str, aliases: dict[str, str]) -> str:
    for alias, token in aliases.items():
        text = text.replace(alias, token)
    return text


def require_special_tokens(tokenizer: Tokenizer, tokens: Iterable[str] = (EOS, *PII_TOKENS.values())) -> None:
    """Refuse a tokenizer that lacks the tokens the data pipeline writes (eos and the PII tokens)."""
    missing = [t for t in tokens if tokenizer.token_to_id(t) is None]
    if missing:
        raise CheckpointError(
            f"the tokenizer has no {', '.join(missing)}; neoxko's pipeline needs them as single tokens. "
            "Train one with `neoxko tokenizer train` or use the Polyglot-Ko tokenizer"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 30000, min_frequency: int = 2,
                    length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE in the released Polyglot-Ko layout.

    vocab_size counts the BPE entries with ids 0-3 (<|unused0|>, <|unused1|>, <|endoftext|>,
    <|sep|>); <|acc|>, <|tel|>, <|rrn|> follow at vocab_size, vocab_size + 1, vocab_size + 2. No
    normaliser: every Unicode string (jamo, Hanja, emoji, control characters) decodes back exactly.
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=LEADING_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    learned = tok.get_vocab_size()
    if learned < vocab_size:
        warnings.warn(
            f"the corpus gave only {learned:,} BPE entries of the {vocab_size:,} asked for, so the PII tokens "
            f"{', '.join(PII_TOKENS.values())} get ids {learned}-{learned + 2}, not {vocab_size}-{vocab_size + 2} "
            f"as in Polyglot-Ko; train on more text, or ask for --vocab-size {learned} to make it explicit",
            stacklevel=2)
    tok.add_special_tokens(list(PII_TOKENS.values()))
    return Tokenizer(tok, EOS)


def tokenizer_folder(source: str | Path) -> Path:
    """The folder holding the tokenizer of source: a folder, its tokenizer.json, a built-in model name or
    a hub id (only its tokenizer files are fetched). One without tokenizer.json is refused."""
    path = Path(source)
    folder = path.parent if path.is_file() else resolve(source, allow_patterns=TOKENIZER_FILES)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{source} has no tokenizer.json; pass a tokenizer folder, a model folder "
                              "with one, or a built-in name such as ko-small")
    return folder


def copy_tokenizer_files(source: str | Path, target: str | Path) -> None:
    """Copy the tokenizer files (TOKENIZER_FILES) of source (see tokenizer_folder) into target, next to a
    model's weights; a source without tokenizer.json is refused, never skipped in silence."""
    folder = tokenizer_folder(source)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file() and (folder / name).resolve() != (Path(target) / name).resolve():
            shutil.copy(folder / name, Path(target) / name)


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path, model_max_length: int = 2048) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    specials = [t for t in (EOS, SEP, *PII_TOKENS.values()) if tokenizer.token_to_id(t) is not None]
    special_map = {"eos_token": tokenizer.eos_token, "additional_special_tokens": specials}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **special_map}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, ensure_ascii=False, indent=2) + "\n")
    return folder


def read_texts(paths: Iterable[str | Path], text_key: str = "text") -> Iterator[str]:
    """Documents from .txt (one per line) and .jsonl (the text_key field) files.

    Lines that are not UTF-8 are skipped, never decoded with replacement characters, and a warning
    says how many there were and where the first one is.
    """
    for path in map(Path, paths):
        invalid, first = 0, None
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    invalid, first = invalid + 1, first or n
                    continue
                if path.suffix == ".jsonl":
                    try:
                        text = json.loads(line)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CheckpointError(f"{path}:{n}: not a JSON object with a {text_key!r} field") from None
                else:
                    text = line.rstrip("\r\n")
                if text:
                    yield text
        if invalid:
            warnings.warn(f"{path}: skipped {invalid} line(s) that are not UTF-8 (the first is line {first})",
                          stacklevel=2)
