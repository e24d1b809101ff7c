"""LoRA: low-rank adapters on linear layers, in peft's module layout and file format.

A wrapped layer computes base(x) + lora_B(lora_A(dropout(x))) * scaling, scaling = alpha / r (alpha / sqrt(r)
with rsLoRA), r and alpha per layer where peft's rank_pattern and alpha_pattern say so. DoRA (use_dora) rescales each
output row of W + scaling * B A to its learned magnitude; layers_to_transform picks layers by index; modules_to_save
replaces whole modules (the embedding, the head) with the adapter's copies. The wrapper keeps peft's names,
`base_layer`, `lora_A`, `lora_B`, so an adapter file holds `base_model.model.<layer>.lora_A.weight` keys exactly as
peft writes them, and the base weights keep their Hugging Face names once `base_layer.` is dropped
(train.build.plain_name does that). lora_B starts at zero:
at step 0 the adapted model is the base model.
"""

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from neoxko.errors import CheckpointError, ConfigError

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # GPT-NeoX's linear layers
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] | str = ("query_key_value",)  # names (peft: the layer name or its last part) or a regex
    rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)  # peft's: a layer-name pattern -> its rank
    alpha_pattern: dict = field(default_factory=dict)  # a layer-name pattern -> its alpha
    layers: tuple[int, ...] | None = None  # peft's layers_to_transform: only the blocks of these indexes
    layers_pattern: tuple[str, ...] | None = None  # the name before a block's index ("layers"); None: any
    modules_to_save: tuple[str, ...] = ()  # whole modules the adapter holds a copy of (embed_in, embed_out)
    exclude: tuple[str, ...] | str = ()  # peft's exclude_modules
    dora: bool = False

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora_r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"lora_targets is empty; name some of {', '.join(TARGETS)}")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"lora_alpha must be a finite number, got {self.alpha}")
        for pattern, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ConfigError(f"rank_pattern gives {pattern!r} the rank {rank!r}; a rank is a whole number of at "
                                  "least 1")
        for pattern, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ConfigError(f"alpha_pattern gives {pattern!r} the alpha {alpha!r}; an alpha is a finite number")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def rank_for(self, name: str) -> int:
        """The rank of the layer called name: its rank_pattern entry (peft's first matching key), else r."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, name), self.r)

    def scaling_for(self, name: str) -> float:
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, name), self.alpha)
        r = self.rank_for(name)
        return alpha / (math.sqrt(r) if self.rslora else r)

    def peft_config(self, base_model: str | None) -> dict:
        """adapter_config.json as peft writes it (the fields peft's LoraConfig reads; the rest keep peft's defaults)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.targets if isinstance(self.targets, str) else sorted(self.targets),
                "use_rslora": self.rslora, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": list(self.modules_to_save) or None, "init_lora_weights": True,
                "inference_mode": True, "use_dora": self.dora, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern),
                "layers_to_transform": list(self.layers) if self.layers is not None else None,
                "layers_pattern": list(self.layers_pattern) if self.layers_pattern else None,
                "exclude_modules": (self.exclude if isinstance(self.exclude, str) else list(self.exclude)) or None}

    @classmethod
    def from_peft(cls, config: dict, where: Path) -> "LoraSettings":
        """The settings of a peft LoRA adapter_config.json; what neoxko cannot apply is refused by name."""
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{where} is a {config.get('peft_type')} adapter; neoxko applies LoRA adapters only")
        refused = [(key, config.get(key)) for key, ok in (
            ("bias", lambda v: v in (None, "none")), ("fan_in_fan_out", lambda v: not v),
            ("lora_bias", lambda v: not v), ("trainable_token_indices", lambda v: not v),
            ("target_parameters", lambda v: not v), ("layer_replication", lambda v: not v),
            ("use_qalora", lambda v: not v), ("alora_invocation_tokens", lambda v: not v),
        ) if not ok(config.get(key))]
        if refused:
            shown = ", ".join(f"{k}={v!r}" for k, v in refused)
            raise CheckpointError(f"{where} uses {shown}, which neoxko does not apply; merge it with peft "
                                  "(PeftModel.merge_and_unload) and load the merged model instead")
        targets = config.get("target_modules")
        if not targets:
            raise CheckpointError(f"{where} names no target_modules")
        layers = config.get("layers_to_transform")
        pattern = config.get("layers_pattern")
        try:
            return cls(r=_whole(config.get("r", 8), "r", where), alpha=_number(config.get("lora_alpha", 8), where),
                       dropout=float(config.get("lora_dropout") or 0),
                       targets=targets if isinstance(targets, str) else tuple(targets),
                       rslora=bool(config.get("use_rslora", False)),
                       rank_pattern=dict(config.get("rank_pattern") or {}),
                       alpha_pattern=dict(config.get("alpha_pattern") or {}),
                       layers=None if layers is None else (layers,) if isinstance(layers, int) else tuple(layers),
                       layers_pattern=(pattern,) if isinstance(pattern, str) and pattern else
                       tuple(pattern) if pattern else None,
                       modules_to_save=tuple(config.get("modules_to_save") or ()),
                       exclude=config.get("exclude_modules") or (), dora=bool(config.get("use_dora", False)))
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None


def _whole(value, name: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where} has {name} {value!r}; a rank is a whole number of at least 1")
    return value


def _number(value, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where} has lora_alpha {value!r}; it must be a finite number")
    return float(value)


def pattern_key(patterns, name: str) -> str:
    """peft's get_pattern_key: the first pattern that matches the end of the layer name (at a dot), else the name."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), name)


class Wrapped(nn.Module):
    """A module around a linear layer (base_layer) that passes for it: the same in_features and out_features."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class LoRALinear(Wrapped):
    """A frozen linear layer (nn.Linear, or an int8 one) plus a trainable low-rank update, in float32; with DoRA, a
    magnitude per output row that the updated weight's rows are rescaled to (peft's lora_magnitude_vector)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, dora: bool = False):
        super().__init__()
        self.base_layer = base
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout, self.scaling = dropout, scaling
        self.lora_magnitude_vector = nn.Parameter(torch.ones(base.out_features, device=device)) if dora else None

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_magnitude_vector is not None:  # DoRA: the rescaled weight, made as merging makes it
            base = self.base_layer
            bias = base.bias.to(x.dtype) if base.bias is not None else None
            return nn.functional.linear(x, self.merged_weight().to(x.dtype), bias)
        y = self.base_layer(x)
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        scaling = self.scaling
        if self.training and self.dropout:
            h, kept = dropout(h, self.dropout)
            scaling /= kept  # inverted dropout's 1 / (1 - p), applied to the rank-r output instead of to x
        return torch.add(y, self.lora_B(self.lora_A(h)).to(y.dtype), alpha=scaling)

    def delta(self) -> Tensor:
        """The update as one matrix (out, in), float32: scaling * B @ A."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> Tensor:
        """W + scaling * B A in float32, each output row rescaled to its DoRA magnitude where the adapter has one."""
        base = self.base_layer
        if not isinstance(base, nn.Linear):
            raise CheckpointError("a DoRA adapter applies to float weights; load the float model with it, then "
                                  "quantize")
        weight = base.weight.float() + self.delta().to(base.weight.device)
        if self.lora_magnitude_vector is None:
            return weight
        norm = torch.linalg.vector_norm(weight, dim=1)
        return weight * (self.lora_magnitude_vector.float() / norm)[:, None]


def dropout(x: Tensor, p: float) -> tuple[Tensor, float]:
    """x with each element zeroed with probability p, not rescaled, and the share kept (1 - p): the caller
    rescales the (much smaller) low-rank output instead. On the CPU the mask comes from the bits of one 31-bit
    draw per two elements (16 and 15 bits, p kept to 1/32768), about a third of the cost of F.dropout's
    Bernoulli sampling, which was a quarter of a LoRA step there (peft draws a mask of each adapted layer's
    input, as this does)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # (compiled: inductor's own fused generator)
        return torch.where(torch.rand_like(x) >= p, x, 0), 1 - p
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16).view(-1, 2)
    drop = round(p * 32768)
    # little-endian halves of a value in [0, 2^31): the low one uniform on [-32768, 32768), the high one on [0, 32768)
    low, high = (drop * 2 - 32768, drop) if sys.byteorder == "little" else (drop, drop * 2 - 32768)
    keep = bits >= torch.tensor([low, high], dtype=torch.int16)
    return torch.where(keep.view(-1)[:n].view(x.shape), x, 0), 1 - drop / 32768


def matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """peft's rule: a regex matches the whole layer name; a name matches the layer or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def targeted(name: str, settings: LoraSettings) -> bool:
    """Whether peft would adapt the layer called name: not excluded nor saved whole, matched by target_modules and
    (for a list of targets) in one of layers_to_transform's blocks."""
    exclude = settings.exclude
    if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str) else matches(name, tuple(exclude))):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in settings.modules_to_save):
        return False
    if not matches(name, settings.targets):
        return False
    if settings.layers is None or isinstance(settings.targets, str):
        return True
    if settings.layers_pattern:
        found = next((m for p in settings.layers_pattern if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    else:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return found is not None and int(found.group(1)) in settings.layers


def target_layers(modules, settings: LoraSettings) -> list[tuple[str, nn.Module]]:
    """Of modules ((name, module) pairs: a model's named_modules()), each linear layer the settings adapt; none is a
    ConfigError naming GPT-NeoX's layers."""
    found = [(name, module) for name, module in modules
             if targeted(name, settings) and hasattr(module, "in_features") and name != "embed_out"]
    if not found:
        blocks = f" (in blocks {list(settings.layers)})" if settings.layers else ""
        raise ConfigError(f"lora_targets {settings.targets!r} matched no linear layer{blocks}; GPT-NeoX's are "
                          f"{', '.join(TARGETS)}")
    return found


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the target linear layers in place (each with its rank and scaling) and freeze everything else; returns
    the wrapped layers' names."""
    found = target_layers(model.named_modules(), settings)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in found:
        parent, _, child = name.rpartition(".")
        layer = LoRALinear(module, settings.rank_for(name), settings.scaling_for(name), settings.dropout, settings.dora)
        setattr(model.get_submodule(parent), child, layer)
    return [name for name, _ in found]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector")


def init_lora(model: nn.Module, seed: int) -> None:
    """peft's init: lora_A kaiming-uniform (bound 1 / sqrt(in_features)), lora_B zero. Each A is drawn whole from a
    generator seeded by its layer's name, so every world size and sharding gets the same adapter."""
    import zlib

    from neoxko.train.names import assign, plain_name

    for name, param in model.named_parameters():
        name = plain_name(name)
        if name.endswith("lora_B.weight"):
            param.detach().zero_()
        elif name.endswith("lora_A.weight"):
            gen = torch.Generator(param.device).manual_seed((seed << 32) | zlib.crc32(name.encode()))
            bound = 1 / math.sqrt(param.shape[1])
            full = torch.empty(param.shape, device=param.device).uniform_(-bound, bound, generator=gen)
            with torch.no_grad():
                assign(param, full)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (W + scaling * B A, rescaled per row with DoRA) and drop the
    wrappers, in place."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if not isinstance(base, nn.Linear):
            raise CheckpointError(f"{name} is quantized; merge the adapter into the float model, then quantize")
        with torch.no_grad():
            base.weight.copy_(layer.merged_weight().to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    return model


def save_adapter(state: dict[str, Tensor], settings: LoraSettings, dest: Path, base_model: str | None) -> Path:
    """adapter_config.json and adapter_model.safetensors with peft's keys, from our-named lora tensors."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state.items()}
    save_file(tensors, dest / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (dest / ADAPTER_CONFIG).write_text(json.dumps(settings.peft_config(base_model), indent=2) + "\n", encoding="utf-8")
    return dest


def read_adapter(folder: Path) -> tuple[LoraSettings, dict[str, Tensor], dict]:
    """(settings, tensors under our names, the raw adapter_config) of a peft LoRA folder, ours or peft's."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}; is it a LoRA adapter folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    settings = LoraSettings.from_peft(config, config_file)
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        raw = load_file(weights)
    elif (folder / "adapter_model.bin").is_file():
        raw = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (or adapter_model.bin)")
    state = {}
    for key, tensor in raw.items():
        name = _our_name(key)
        if ".lora_embedding_" in name:
            raise CheckpointError(f"{weights.name} holds {key!r}: a LoRA on an embedding layer, which neoxko does not "
                                  "apply; merge it with peft (PeftModel.merge_and_unload) and load the merged model")
        if not is_lora_key(name) and not any(re.search(rf"(^|\.){re.escape(m)}\.[^.]+$", name)
                                             for m in _saved_names(settings.modules_to_save)):
            raise CheckpointError(f"{weights.name} holds {key!r}, which is neither a LoRA tensor nor a module its "
                                  f"modules_to_save names ({list(settings.modules_to_save)})")
        state[name] = tensor
    return settings, state, config


def _our_name(key: str) -> str:
    """A peft adapter key under neoxko's module names: no prefix nor adapter name, the head as embed_out."""
    name = key.removeprefix(PEFT_PREFIX)
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.default.", f".{part}.")
    name = re.sub(r"\.lora_magnitude_vector(\.default)?(\.weight)?$", ".lora_magnitude_vector", name)
    name = name.replace(".modules_to_save.default.", ".")
    return "embed_out." + name.removeprefix("lm_head.") if name.startswith("lm_head.") else name


def _saved_names(modules: tuple[str, ...]) -> set[str]:
    """modules_to_save under neoxko's names (transformers 5 calls GPT-NeoX's head lm_head)."""
    return {"embed_out" if m == "lm_head" else m for m in modules}


def load_adapter(model: nn.Module, folder: Path, merge: bool = True) -> nn.Module:
    """Apply a LoRA adapter folder (ours or one peft wrote) to the model, merged into the weights by default."""
    settings, state, _ = read_adapter(folder)
    saved = {name: t for name, t in state.items() if not is_lora_key(name)}
    state = {name: t for name, t in state.items() if is_lora_key(name)}
    check_ranks(settings, state, folder)  # (before any memory is taken for the rank adapter_config.json claims)
    wrapped = apply_lora(model, settings)
    check_tensors(wrapped, settings, state, folder)
    layers = lora_layers(model)
    for name, tensor in state.items():
        layer_name, _, rest = name.rpartition(".lora_")
        part = getattr(layers[layer_name], "lora_" + rest.split(".")[0])
        target = part if isinstance(part, nn.Parameter) else part.weight
        _copy(target, tensor, name, folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in saved.items():  # whole modules: a new parameter (a tied head keeps the base's embedding)
        if name not in params:
            raise CheckpointError(f"the adapter in {folder} saves {name}, which this model has no parameter for")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        _copy(params[name], tensor, name, folder, check_only=True)
        setattr(module, attr, nn.Parameter(tensor.to(params[name].device, params[name].dtype), requires_grad=False))
    config = getattr(model, "config", None)
    if saved and getattr(config, "tie_word_embeddings", False) and \
            model.embed_out.weight is not model.gpt_neox.embed_in.weight:  # (the saved copy untied them, as in peft)
        model.config = dataclasses.replace(config, tie_word_embeddings=False)  # (so .to() and saving keep them apart)
    for param in model.parameters():  # an inference model: nothing trains
        param.requires_grad_(False)
    return merge_lora(model) if merge else model


def check_ranks(settings: LoraSettings, state: dict[str, Tensor], folder: Path) -> None:
    """Each lora_A holds the rank adapter_config.json gives its layer."""
    for name, tensor in state.items():
        layer_name = name.rpartition(".lora_")[0]
        if name.endswith(".lora_A.weight") and tensor.shape[0] != settings.rank_for(layer_name):
            raise CheckpointError(f"{folder}/{ADAPTER_CONFIG} gives {layer_name} rank {settings.rank_for(layer_name)}, "
                                  f"but its lora_A holds rank {tensor.shape[0]}; the config is not this adapter's")


def check_tensors(layers: list[str], settings: LoraSettings, state: dict[str, Tensor], folder: Path) -> None:
    """The adapter's LoRA tensors are exactly those of the layers it adapts in this model."""
    expected = {f"{name}.lora_{ab}.weight" for name in layers for ab in "AB"}
    if settings.dora:
        expected |= {f"{name}.lora_magnitude_vector" for name in layers}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = (f"lacks {', '.join(missing[:3])}" if missing else "") + \
            (f" holds {', '.join(unexpected[:3])}, which this model has no layer for" if unexpected else "")
        raise CheckpointError(f"the adapter in {folder} does not fit this model: it {what.strip()} "
                              f"(target_modules {settings.targets!r}); was it trained on another base model?")


def _copy(target: Tensor, tensor: Tensor, name: str, folder: Path, check_only: bool = False) -> None:
    if target.shape != tensor.shape:
        raise CheckpointError(f"the adapter in {folder} has {name} of shape {tuple(tensor.shape)}, but this model "
                              f"needs {tuple(target.shape)}; was it trained on another base model?")
    if not check_only:
        with torch.no_grad():
            target.copy_(tensor)
