"""Int8 weight-only quantization: a state-dict transform plus a module swap.

Every nn.Linear (attention, MLP and the output head) becomes an Int8Linear, except an output head
tied to the input embedding, which keeps sharing it (an int8 copy beside the float embedding would make
the file larger than the unquantized one): int8 weights with one
float scale per output channel (symmetric, scale = max |w| / 127), dequantized inside the matrix
product by torch's int8 weight-only kernel. Embedding lookups, LayerNorms and biases stay in float.
Decoding on a CPU reads every weight once per token, so halving the bytes of the bf16 weights makes
it up to twice as fast; the quality cost is measured in benchmarks/decode.py and the model card.

On disk: config.json gains a quantization_config, each quantized `X.weight` is int8 and comes with
an `X.weight_scale`.
"""

import torch
from torch import Tensor, nn

QUANT_METHOD = "neoxko_int8"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "scheme": "weight-only, symmetric, per output channel",
                       "modules": "every nn.Linear (attention, MLP, embed_out)"}


# Inductor's reduction is fast for rows up to this long; longer ones (GPT-NeoX's 4h -> h) use torch's kernel.
FUSED_MAX_IN = 4096


@torch.library.custom_op("neoxko::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A copy that torch.compile cannot fuse into its consumer."""
    return x.clone()


@materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        weight, scale = quantize_weight(w)
        module.weight.copy_(weight)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if torch.compiler.is_compiling() and x.numel() == shape[-1] and shape[-1] <= FUSED_MAX_IN:
            # One row (batch-1 decoding) under torch.compile: written as a reduction, inductor fuses the
            # int8 load, the conversion and the multiply-add into one pass over the weights, near the
            # memory bandwidth (2x the compiled bf16 matrix-vector product on a Zen 4 CPU). The input is
            # materialized first: fused into the reduction, its producer (a LayerNorm, a GELU) would be
            # recomputed for every output row.
            x32 = materialize(x.float())
            y = ((x32.unsqueeze(-2) * self.weight).sum(-1) * self.weight_scale.float()).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight,
                                                   self.weight_scale.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weights and per-row scales (in the weight's dtype) with weight ~= int8 * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.to(weight.dtype)


def dequantize(module: Int8Linear) -> Tensor:
    return module.weight.float() * module.weight_scale.float()[:, None]


GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel takes


class Int4Linear(nn.Module):
    """Weight-only int4 with a scale and a zero per group of group_size input features: w ~= (q - 8) * scale + zero
    with q in 0..15 (asymmetric: zero = min + 8 * scale, scale = (max - min) / 15), so a weight is off by at most
    half a step, (max - min) / 30 of its group's range. torch's CPU kernel (_weight_int4pack_mm_for_cpu) unpacks
    the nibbles inside the matrix product: a quarter of bf16's bytes per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("scales_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype,
                                                         device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.dtype,
                     w.device)
        q, scales_zeros = quantize_weight_int4(w, group_size)
        module.weight_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        module.scales_zeros = scales_zeros
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        sz = self.scales_zeros if self.scales_zeros.dtype == x.dtype else self.scales_zeros.to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).contiguous(), self.weight_packed,
                                                       self.group_size, sz)
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


def quantize_weight_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """q (out, in) int32 in 0..15 and scales_zeros (in / group_size, out, 2) in the weight's dtype."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    zero = (low + 8 * scale).to(weight.dtype).float()  # rounded as the kernel will see it, then q fitted to it
    scale = scale.to(weight.dtype).float()
    q = ((w - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32).view(n, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)


def check_int4(model: nn.Module, group_size: int, device) -> None:
    """Refuse, by name, what the int4 kernel cannot do: another group size, a layer it does not divide, a GPU."""
    from neoxko.errors import NeoxkoError

    if group_size not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES))
        raise NeoxkoError(f"int4 group size {group_size} is not supported; use one of {sizes}")
    if torch.device(device).type != "cpu":
        raise NeoxkoError(f"int4 runs on the CPU only (torch's _weight_int4pack_mm_for_cpu); got device {device!r}: "
                          "use --quantize int8 there, or --device cpu")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features % group_size:
            raise NeoxkoError(f"int4 group size {group_size} does not divide {name}'s {module.in_features} input "
                              f"features; pick a group size that does ({', '.join(map(str, GROUP_SIZES))})")


def quantize_model(model: nn.Module, empty: bool = False, tied_head: str = "float", bits: int = 8,
                   group_size: int = 64) -> nn.Module:
    """Swap every nn.Linear for an Int8Linear (bits 8) or an Int4Linear (bits 4, groups of group_size), in place;
    empty=True only builds the int8 modules (for loading).

    tied_head "float" leaves a head tied to the embedding as it is; "int8" quantizes it too (files
    written before neoxko 0.2 are laid out so)."""
    if getattr(model, "quantized", False):
        return model
    if bits == 4:
        check_int4(model, group_size, next(model.parameters()).device)
        keep = {"embed_out"} if getattr(model.config, "tie_word_embeddings", False) else set()
        for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Int4Linear.from_linear(linear, group_size))
        model.quantized, model.quant_bits = True, 4
        model.tied_head = "float" if keep else None
        return model
    keep = {"embed_out"} if getattr(model.config, "tie_word_embeddings", False) and tied_head == "float" else set()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name not in keep]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        if empty:
            new = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                             linear.weight.dtype, linear.weight.device)
        else:
            new = Int8Linear.from_linear(linear)
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.quantized = True
    model.tied_head = tied_head if keep or tied_head == "int8" and model.config.tie_word_embeddings else None
    return model
