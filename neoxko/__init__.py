"""neoxko: GPT-NeoX-Ko (Polyglot-Ko) as a Python toolkit.

The public names load on first use, so `neoxko --help` and other light commands start without torch.
"""

import importlib

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
