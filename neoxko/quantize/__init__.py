"""Int8 quantization of the weights: a state-dict transform plus a module swap.

Every nn.Linear (attention, MLP and the output head) becomes an Int8Linear, except an output head
tied to the input embedding, which keeps sharing it (an int8 copy beside the float embedding would make
the file larger than the unquantized one): int8 weights with one
float scale per output channel (symmetric, scale = max |w| / 127). Without neoxko's kernels they are
dequantized inside the matrix product by torch's int8 weight-only kernel. Embedding lookups, LayerNorms and
biases stay in float.
Decoding on a CPU reads every weight once per token, so halving the bytes of the bf16 weights makes
it up to twice as fast; the quality cost is measured in benchmarks/decode.py and the model card.

On CPUs where neoxko's kernels are built (neoxko.kernels) the int8 weights are kept tile-major in memory and
multiplied by int8-quantized activations (VNNI); elsewhere torch's kernels run on row-major weights.

On disk: config.json gains a quantization_config, each quantized `X.weight` is int8 (row-major) and comes with
an `X.weight_scale`. Int4 (Int4Linear, neoxko.quantize.int4) has its own layout: `X.qweight` (uint8, two 4-bit
values a byte), `X.scales` and `X.zeros`, under quant_method neoxko_int4.
"""

import os

import torch
from torch import Tensor, nn

from neoxko import kernels
from neoxko.hardware import detect
from neoxko.quantize.int4 import (  # noqa: F401
    GROUP_SIZES,
    INT4_METHOD,
    Int4Linear,
    check_int4,
    int4_config,
    pack_nibbles,
    quantize_weight_int4,
    unpack_kernel_layout,
    unpack_nibbles,
)

QUANT_METHOD = "neoxko_int8"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "scheme": "weight-only, symmetric, per output channel",
                       "layout": "weight int8 (out, in), row-major; weight_scale (out) in the model's dtype: "
                                 "w = weight * weight_scale[:, None]",
                       "modules": "every nn.Linear (attention, MLP, embed_out)",
                       "readers": "neoxko's own layout, the same on every machine, loaded by neoxko on any CPU; for "
                                  "llama.cpp: neoxko export --format gguf"}


# Inductor's reduction is fast for rows up to this long; longer ones (GPT-NeoX's 4h -> h) use torch's kernel.
FUSED_MAX_IN = 4096


def fused_int8_choice(setting: str | None, hardware) -> bool:
    """The fused reduction only on CPUs where it was measured faster (neoxko.hardware); NEOXKO_FUSED_INT8=0/1
    overrides."""
    return {"0": False, "1": True}.get(setting or "", hardware.fused_int8)


FUSED_INT8 = fused_int8_choice(os.environ.get("NEOXKO_FUSED_INT8"), detect())
# From this many rows at once (prefill, batched decoding), int8 layers quantize their activations per row and
# multiply int8 by int8 (W8A8), where the CPU does that fast (neoxko.hardware); NEOXKO_INT8_ACTIVATIONS=0/1 overrides.
W8A8_MIN_ROWS = 8
INT8_ACTIVATIONS = {"0": False, "1": True}.get(os.environ.get("NEOXKO_INT8_ACTIVATIONS", ""),
                                               detect().int8_activations)


@torch.library.custom_op("neoxko::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A copy that torch.compile cannot fuse into its consumer."""
    return x.clone()


@materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, kernel: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # neoxko's kernel: the weight is held tile-major (kernels.tile_int8); on disk and in state dicts row-major
        self.kernel = _use_kernel(in_features, out_features, device) if kernel is None else kernel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: bool | None = None) -> "Int8Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, kernel)
        weight, scale = quantize_weight(w)
        module.weight = kernels.tile_int8(weight) if module.kernel else weight
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        amx = INT8_ACTIVATIONS and x.numel() >= W8A8_MIN_ROWS * shape[-1]  # AMX tiles beat VNNI at many rows
        if self.kernel and kernels.takes(x) and not amx:
            return kernels.int8_linear(x, self.weight, self.weight_scale, self.bias)
        weight = kernels.untile_int8(self.weight) if self.kernel else self.weight  # (AMX, or a gradient wanted)
        if FUSED_INT8 and torch.compiler.is_compiling() and x.numel() == shape[-1] and shape[-1] <= FUSED_MAX_IN:
            # One row (batch-1 decoding) under torch.compile: written as a reduction, inductor fuses the
            # int8 load, the conversion and the multiply-add into one pass over the weights, near the
            # memory bandwidth (2x the compiled bf16 matrix-vector product on a Zen 4 CPU). The input is
            # materialized first: fused into the reduction, its producer (a LayerNorm, a GELU) would be
            # recomputed for every output row.
            x32 = materialize(x.float())
            y = ((x32.unsqueeze(-2) * weight).sum(-1) * self.weight_scale.float()).to(x.dtype)
        elif INT8_ACTIVATIONS and x.numel() >= W8A8_MIN_ROWS * shape[-1] and not x.requires_grad:
            y = int8_matmul(x.reshape(-1, shape[-1]), weight, self.weight_scale).to(x.dtype)
            y = y.view(*shape[:-1], self.out_features)
        elif torch.is_grad_enabled() and x.requires_grad:  # LoRA on a frozen int8 base: gradients to x only
            y = _Int8MatMul.apply(x.reshape(-1, shape[-1]), weight, self.weight_scale.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), weight, self.weight_scale.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={'neoxko' if self.kernel else 'torch'}")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel and not self.weight.is_meta:
            destination[prefix + "weight"] = kernels.untile_int8(self.weight)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.kernel and prefix + "weight" in state_dict and not self.weight.is_meta:
            self.weight = kernels.tile_int8(self.weight)


def _use_kernel(in_features: int, out_features: int, device) -> bool:
    on_cpu = device is None or torch.device(device).type in ("cpu", "meta")  # (meta: built to be loaded)
    return on_cpu and kernels.eligible(in_features, out_features)


def int8_matmul(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x (M, K) @ (int8 weight * scale).T with x quantized to int8 per row (symmetric, max |x| / 127): one int8 x
    int8 -> int32 product (torch._int_mm, AMX or VNNI), rescaled in float32."""
    x32 = x.float()
    row_scale = x32.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    xq = (x32 / row_scale).round_().to(torch.int8)
    return torch._int_mm(xq, weight.t()).float() * row_scale * scale.float()


class _Int8MatMul(torch.autograd.Function):
    """x @ (int8 * scale).T with a backward for x (the frozen weight gets none): grad_x = (grad_y * scale) @ int8."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(weight, scale)
        return torch.ops.aten._weight_int8pack_mm(x, weight, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scale = ctx.saved_tensors
        return (grad * scale) @ weight.to(grad.dtype), None, None


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weights and per-row scales (in the weight's dtype) with weight ~= int8 * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.to(weight.dtype)


def dequantize(module: Int8Linear) -> Tensor:
    weight = kernels.untile_int8(module.weight) if module.kernel else module.weight
    return weight.float() * module.weight_scale.float()[:, None]


def quantize_model(model: nn.Module, empty: bool = False, tied_head: str = "float", bits: int = 8,
                   group_size: int = 64, kernel: bool | None = None) -> nn.Module:
    """Swap every nn.Linear for an Int8Linear (bits 8) or an Int4Linear (bits 4, groups of group_size), in place;
    empty=True only builds the quantized modules (for loading).

    tied_head "float" leaves a head tied to the embedding as it is; "int8" quantizes it too (files
    written before neoxko 0.2 are laid out so). kernel None uses neoxko's CPU kernels where they fit, False
    keeps torch's (row-major int8 weights: LoRA training on an int8 base reads them in its backward)."""
    if getattr(model, "quantized", False):
        return model
    if bits == 4:
        check_int4(model, group_size, "cpu" if empty else next(model.parameters()).device)
        keep = {"embed_out"} if getattr(model.config, "tie_word_embeddings", False) else set()
        for name, linear in [(n, m) for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) and n not in keep and ".lora_" not in n]:
            parent, _, child = name.rpartition(".")
            new = (Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                              linear.weight.dtype, linear.weight.device, kernel) if empty
                   else Int4Linear.from_linear(linear, group_size, kernel))
            setattr(model.get_submodule(parent) if parent else model, child, new)
        model.quantized, model.quant_bits, model.group_size = True, 4, group_size
        model.tied_head = "float" if keep else None
        return model
    keep = {"embed_out"} if getattr(model.config, "tie_word_embeddings", False) and tied_head == "float" else set()
    targets = [(name, module) for name, module in model.named_modules()  # (never a LoRA adapter's own layers)
               if isinstance(module, nn.Linear) and name not in keep and ".lora_" not in name]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        if empty:
            new = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                             linear.weight.dtype, linear.weight.device, kernel)
        else:
            new = Int8Linear.from_linear(linear, kernel)
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.quantized = True
    model.tied_head = tied_head if keep or tied_head == "int8" and model.config.tie_word_embeddings else None
    return model
