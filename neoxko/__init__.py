"""neoxko: GPT-NeoX-Ko (Polyglot-Ko) as a Python toolkit.

The public names load on first use, so `neoxko --help` and other light commands start without torch.
"""

import importlib
import os
import sys

# libgomp (torch's OpenMP) puts idle threads to sleep almost at once on some machines, and waking one costs
# 0.1-0.3 ms: more than a decoding step's small ops take (F.gelu on 8192 values, 2 threads: 204 us, 15 us with the
# threads kept awake). Spinning longer before sleeping keeps them awake between the ops of one token. libgomp reads
# this when it loads, so it applies only when neoxko is imported before torch (`neoxko info --hardware` says).
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

__version__ = "0.2.0"
_PUBLIC = {
    "load_model": "neoxko.checkpoint", "save_model": "neoxko.checkpoint",
    "PRESETS": "neoxko.config", "ModelConfig": "neoxko.config",
    "NeoxkoError": "neoxko.errors",
    "Sampling": "neoxko.generate", "generate": "neoxko.generate", "stream": "neoxko.generate",
    "GPTNeoX": "neoxko.model",
    "Tokenizer": "neoxko.tokenizer", "load_tokenizer": "neoxko.tokenizer",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neoxko' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
