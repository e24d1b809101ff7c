"""LoRA: low-rank adapters on linear layers, in peft's module layout and file format.

A wrapped layer computes base(x) + lora_B(lora_A(dropout(x))) * scaling, scaling = alpha / r (alpha / sqrt(r)
with rsLoRA). The wrapper keeps peft's names, `base_layer`, `lora_A`, `lora_B`, so an adapter file holds
`base_model.model.<layer>.lora_A.weight` keys exactly as peft writes them, and the base weights keep their
Hugging Face names once `base_layer.` is dropped (train.build.plain_name does that). lora_B starts at zero:
at step 0 the adapted model is the base model.
"""

import json
import math
import re
import sys
from dataclasses import dataclass
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

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora_r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"lora_targets is empty; name some of {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def peft_config(self, base_model: str | None) -> dict:
        """adapter_config.json as peft writes it (the fields peft's LoraConfig reads; the rest keep peft's defaults)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.targets if isinstance(self.targets, str) else sorted(self.targets),
                "use_rslora": self.rslora, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                "init_lora_weights": True, "inference_mode": True, "use_dora": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def from_peft(cls, config: dict, where: Path) -> "LoraSettings":
        """The settings of a peft LoRA adapter_config.json; what neoxko cannot apply is refused by name."""
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{where} is a {config.get('peft_type')} adapter; neoxko applies LoRA adapters only")
        refused = [(key, config.get(key)) for key, ok in (
            ("use_dora", lambda v: not v), ("bias", lambda v: v in (None, "none")),
            ("fan_in_fan_out", lambda v: not v), ("modules_to_save", lambda v: not v),
            ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v),
            ("layers_to_transform", lambda v: v is None), ("lora_bias", lambda v: not v),
            ("trainable_token_indices", lambda v: not v), ("target_parameters", lambda v: not v),
        ) if not ok(config.get(key))]
        if refused:
            shown = ", ".join(f"{k}={v!r}" for k, v in refused)
            raise CheckpointError(f"{where} uses {shown}, which neoxko does not apply; merge it with peft "
                                  "(PeftModel.merge_and_unload) and load the merged model instead")
        targets = config.get("target_modules")
        if not targets:
            raise CheckpointError(f"{where} names no target_modules")
        return cls(r=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                   dropout=float(config.get("lora_dropout", 0)),
                   targets=targets if isinstance(targets, str) else tuple(targets),
                   rslora=bool(config.get("use_rslora", False)))


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, or an int8 one) plus a trainable low-rank update, in float32."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout, self.scaling = dropout, scaling

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
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


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the target linear layers in place and freeze everything else; returns the wrapped layers' names."""
    found = [(name, module) for name, module in model.named_modules()
             if matches(name, settings.targets) and hasattr(module, "in_features") and name != "embed_out"]
    if not found:
        raise ConfigError(f"lora_targets {settings.targets!r} matched no linear layer; GPT-NeoX's are "
                          f"{', '.join(TARGETS)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, settings.r, settings.scaling, settings.dropout))
    return [name for name, _ in found]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def init_lora(model: nn.Module, seed: int) -> None:
    """peft's init: lora_A kaiming-uniform (bound 1 / sqrt(in_features)), lora_B zero. Each A is drawn whole from a
    generator seeded by its layer's name, so every world size and sharding gets the same adapter."""
    import zlib

    from neoxko.train.build import assign, plain_name

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
    """Fold every adapter into its layer's weight (W + scaling * B A) and drop the wrappers, in place."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if not isinstance(base, nn.Linear):
            raise CheckpointError(f"{name} is quantized; merge the adapter into the float model, then quantize")
        with torch.no_grad():
            base.weight.copy_((base.weight.float() + layer.delta().to(base.weight.device)).to(base.weight.dtype))
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
        name = key.removeprefix(PEFT_PREFIX)
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if not is_lora_key(name):
            raise CheckpointError(f"{weights.name} holds {key!r}, which is not a LoRA matrix; neoxko applies "
                                  "lora_A / lora_B weights only")
        state[name] = tensor
    return settings, state, config


def load_adapter(model: nn.Module, folder: Path, merge: bool = True) -> nn.Module:
    """Apply a LoRA adapter folder (ours or one peft wrote) to the model, merged into the weights by default."""
    settings, state, _ = read_adapter(folder)
    wrapped = apply_lora(model, settings)
    expected = {f"{name}.lora_{ab}.weight" for name in wrapped for ab in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = (f"lacks {', '.join(missing[:3])}" if missing else "") + \
            (f" holds {', '.join(unexpected[:3])}, which this model has no layer for" if unexpected else "")
        raise CheckpointError(f"the adapter in {folder} does not fit this model: it {what.strip()} "
                              f"(target_modules {settings.targets!r}); was it trained on another base model?")
    layers = lora_layers(model)
    for name, tensor in state.items():
        layer_name, _, rest = name.rpartition(".lora_")
        target = getattr(layers[layer_name], "lora_" + rest.split(".")[0]).weight
        if target.shape != tensor.shape:
            raise CheckpointError(f"the adapter in {folder} has {name} of shape {tuple(tensor.shape)}, but this model "
                                  f"needs {tuple(target.shape)}; was it trained on another base model?")
        with torch.no_grad():
            target.copy_(tensor)
    for param in model.parameters():  # an inference model: nothing trains
        param.requires_grad_(False)
    return merge_lora(model) if merge else model
