"""ModelConfig: the GPT-NeoX hyperparameters, Hugging Face config.json in and out, size presets."""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from neoxko.errors import ConfigError

# (smallest, largest) accepted per size field: far past any GPT-NeoX (20B: 44 layers, d 6144), short of
# what would only allocate for minutes and fail.
SIZE_LIMITS = {"vocab_size": (1, 1 << 20), "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024),
               "num_attention_heads": (1, 1024), "intermediate_size": (1, 1 << 18),
               "max_position_embeddings": (1, 1 << 20)}
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 30080
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 8192
    rotary_pct: float = 0.5
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    attention_bias: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2

    def __post_init__(self):
        self._check_types_and_ranges()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            raise ConfigError(
                f"rotary_pct {self.rotary_pct} gives {self.rotary_ndims} rotary dims per head of "
                f"{self.head_size}; the count must be even"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary (0 to {self.vocab_size - 1})")

    def _check_types_and_ranges(self) -> None:
        """Every field's type and a range no real model leaves, so a typo fails here with its name, not
        as a huge allocation or a ZeroDivisionError later."""
        for name, (low, high) in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, value := int(value))  # JSON writers may give 2048.0
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{name} is {value:,}; it must be between {low} and {high:,}")
        for name in ("rotary_pct", "rotary_emb_base", "layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for name in ("rotary_emb_base", "layer_norm_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("use_parallel_residual", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name} must be a token id (a whole number) or null, got {value!r}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        # transformers truncates the same way: int(head_size * partial_rotary_factor)
        return int(self.head_size * self.rotary_pct)

    @property
    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (tied embeddings counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        b = int(self.attention_bias)
        attention = 3 * d * d + 3 * d * b + d * d + d * b
        mlp = d * f + f + f * d + d
        layer = attention + mlp + 4 * d  # two LayerNorms, weight and bias
        embeddings = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + 2 * d

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face GPT-NeoX config.json dict (transformers 4 or 5 form)."""
        model_type = hf.get("model_type")
        if model_type != "gpt_neox":
            raise ConfigError(
                f"model_type is {model_type!r}, but neoxko runs GPT-NeoX models (model_type "
                "'gpt_neox'); use transformers for other architectures"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported; only 'default' RoPE is")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in known}
        # Newest form first: rope_parameters (transformers 5), then the 4.4x aliases, then GPT-NeoX's own.
        kwargs["rotary_pct"] = rope.get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
        )
        kwargs["rotary_emb_base"] = rope.get(
            "rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
        )
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = eos[0] if eos else None
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config.json has a field of the wrong type: {e}") from None

    def to_hf(self) -> dict:
        """The config.json dict that transformers (4.x and 5.x) and vLLM read as GPTNeoXConfig."""
        hf = asdict(self)
        hf["rotary_emb_base"] = float(self.rotary_emb_base)
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **hf,
                "use_cache": True}

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(hf).__name__}")
        return cls.from_hf(hf)

    def save(self, path: str | Path, dtype: str | None = None, extra: dict | None = None) -> None:
        hf = self.to_hf() | (extra or {})
        if dtype is not None:
            hf["dtype"] = dtype  # transformers 5 name
            hf["torch_dtype"] = dtype  # transformers 4 and vLLM name
        Path(path).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


def pad_vocab_size(n: int, multiple: int = 128) -> int:
    """Embedding rows for a vocabulary of n tokens, rounded up as GPT-NeoX does (30,003 -> 30,080)."""
    return math.ceil(n / multiple) * multiple


def _polyglot(layers: int, d_model: int, heads: int, rotary_pct: float) -> ModelConfig:
    return ModelConfig(
        vocab_size=30080, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * d_model, rotary_pct=rotary_pct,
    )


# The released Polyglot-Ko sizes; RoPE covers 64 dims of every head in all of them (model cards).
PRESETS: dict[str, ModelConfig] = {
    "polyglot-ko-1.3b": _polyglot(24, 2048, 16, 0.5),
    "polyglot-ko-3.8b": _polyglot(32, 3072, 24, 0.5),
    "polyglot-ko-5.8b": _polyglot(28, 4096, 16, 0.25),
    "polyglot-ko-12.8b": _polyglot(40, 5120, 40, 0.5),
}
