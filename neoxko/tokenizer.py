"""The byte-level BPE tokenizer: loading tokenizer.json with the `tokenizers` library."""

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from neoxko.checkpoint import resolve
from neoxko.errors import CheckpointError

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: HFTokenizer, eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token is not None else None

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(
                f"{folder} has no tokenizer.json; neoxko reads the fast-tokenizer file that "
                "transformers' tokenizer.save_pretrained writes"
            )
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise CheckpointError(f"{file} is not a valid tokenizer.json: {e}") from None
        return cls(tokenizer, _eos_token(folder, tokenizer))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

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
    """Load tokenizer.json (and the eos token from tokenizer_config.json) from a folder or hub id."""
    return Tokenizer.from_dir(resolve(path_or_id, allow_patterns=TOKENIZER_FILES))


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
