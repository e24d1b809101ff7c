"""neoxko: GPT-NeoX-Ko (Polyglot-Ko) as a Python toolkit."""

from neoxko.checkpoint import load_model, save_model
from neoxko.config import PRESETS, ModelConfig
from neoxko.errors import NeoxkoError
from neoxko.generate import Sampling, generate, stream
from neoxko.model import GPTNeoX
from neoxko.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "GPTNeoX", "ModelConfig", "NeoxkoError", "PRESETS", "Sampling", "Tokenizer",
    "generate", "load_model", "load_tokenizer", "save_model", "stream",
]
__version__ = "0.1.0"
