"""Korean PII replacement, the card's privacy step: resident registration, phone and bank account numbers become
<|rrn|>, <|tel|> and <|acc|>. replace.py finds them, documents.py feeds it whole files, stream.py masks text that
arrives in pieces; score.py, synth.py and genres.py measure it."""

from neoxko.pii.compiled import install

install()  # (the compiled core, where it was built from these sources: before the modules it serves are imported)

from neoxko.pii.replace import TOKENS, Span, find_pii, replace_pii, replace_pii_counted  # noqa: E402
from neoxko.pii.stream import PIIStream  # noqa: E402

__all__ = ["TOKENS", "PIIStream", "Span", "find_pii", "replace_pii", "replace_pii_counted"]
