"""Int8 weight-only quantization: a state-dict transform plus a module swap.

Every nn.Linear (attention, MLP and the output head) becomes an Int8Linear, except an output head
tied to the input embedding, which keeps sharing it (an int8 copy beside the float embedding would make
the file larger than the unquantized one): int8 weights with one
float scale per output channel (symmetric, scale = max |w| / 127), dequantized inside the matrix
product by torch's int8 weight-only kernel. Embedding lookups, LayerNorms and biases stay in float.
Decoding on a CPU reads every weight once per token, so halving the bytes of the bf16 weights makes
it up to twice as fast; the quality cost is measured in benchmarks/decode.py and the model card.

On disk: config.json gains a quantization_config, each quantized `X.weight` is int8 and comes with
an `X.weight_scale`. Int4 (Int4Linear, below) has its own layout: `X.qweight` (uint8, two 4-bit values a byte),
`X.scales` and `X.zeros`, under quant_method neoxko_int4.
"""

import os

import torch
from torch import Tensor, nn

from neoxko.hardware import detect

QUANT_METHOD = "neoxko_int8"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "scheme": "weight-only, symmetric, per output channel",
                       "modules": "every nn.Linear (attention, MLP, embed_out)"}


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
        if FUSED_INT8 and torch.compiler.is_compiling() and x.numel() == shape[-1] and shape[-1] <= FUSED_MAX_IN:
            # One row (batch-1 decoding) under torch.compile: written as a reduction, inductor fuses the
            # int8 load, the conversion and the multiply-add into one pass over the weights, near the
            # memory bandwidth (2x the compiled bf16 matrix-vector product on a Zen 4 CPU). The input is
            # materialized first: fused into the reduction, its producer (a LayerNorm, a GELU) would be
            # recomputed for every output row.
            x32 = materialize(x.float())
            y = ((x32.unsqueeze(-2) * self.weight).sum(-1) * self.weight_scale.float()).to(x.dtype)
        elif INT8_ACTIVATIONS and x.numel() >= W8A8_MIN_ROWS * shape[-1] and not x.requires_grad:
            y = int8_matmul(x.reshape(-1, shape[-1]), self.weight, self.weight_scale).to(x.dtype)
            y = y.view(*shape[:-1], self.out_features)
        elif torch.is_grad_enabled() and x.requires_grad:  # LoRA on a frozen int8 base: gradients to x only
            y = _Int8MatMul.apply(x.reshape(-1, shape[-1]), self.weight, self.weight_scale.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight,
                                                   self.weight_scale.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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
    return module.weight.float() * module.weight_scale.float()[:, None]


GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel takes
INT4_METHOD = "neoxko_int4"


def int4_config(group_size: int) -> dict:
    return {"quant_method": INT4_METHOD, "bits": 4, "group_size": group_size,
            "scheme": "weight-only, asymmetric per group of group_size input features: w = (q - 8) * scale + zero, "
                      "q in 0..15",
            "layout": "qweight uint8 (out, in / 2), input feature 2j in the low nibble and 2j + 1 in the high one; "
                      "scales and zeros (out, in / group_size)",
            "modules": "every nn.Linear (attention, MLP, embed_out unless tied to the embedding)"}


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
        module.weight_packed = _convert_int4(q)
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

    # In a state dict (and so on disk) the weights are in the portable layout, not in the kernel's, which
    # differs from one CPU to another.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.weight_packed.is_meta:
            qweight = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8, device="meta")
        else:
            qweight = pack_nibbles(unpack_kernel_layout(self.weight_packed, self.out_features, self.in_features))
        destination[prefix + "qweight"] = qweight
        destination[prefix + "scales"] = self.scales_zeros[..., 0].t().contiguous()
        destination[prefix + "zeros"] = self.scales_zeros[..., 1].t().contiguous()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        names = ["qweight", "scales", "zeros"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + name for name in names if prefix + name not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        q = unpack_nibbles(state_dict[prefix + "qweight"])
        self.weight_packed = _convert_int4(q)
        scales, zeros = state_dict[prefix + "scales"], state_dict[prefix + "zeros"]
        self.scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()
        if self.bias is not None:
            self.bias = nn.Parameter(state_dict[prefix + "bias"], requires_grad=False)


def pack_nibbles(q: Tensor) -> Tensor:
    """(out, in) values in 0..15 -> uint8 (out, in / 2): input feature 2j in the low nibble, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """pack_nibbles undone: int32 (out, in), as torch's converter takes it."""
    return _nibbles(packed).view(packed.shape[0], -1)


def unpack_kernel_layout(packed: Tensor, n: int, k: int) -> Tensor:
    """The (n, k) int32 values in 0..15 behind torch's CPU int4 layout. That layout depends on the CPU (blocks of 64
    rows paired 32 apart on AVX-512, smaller blocks for the last rows, other blocks elsewhere), so it is read, not
    assumed: index patterns are packed by the same converter at two small widths, which tells each row's block,
    its place in the block and the block's width; the values are then gathered from there and packed again to
    check. Where that check fails, every element's place is read at full size (slower, but exact)."""
    slots = _nibbles(packed)
    positions = _kernel_positions(n, k)
    q = slots[positions].view(n, k)
    if torch.equal(_convert_int4(q), packed):
        return q
    q = torch.empty(n * k, dtype=torch.int32)
    q[_probe_positions(n, k)] = slots
    q = q.view(n, k)
    if not torch.equal(_convert_int4(q), packed):
        from neoxko.errors import NeoxkoError

        raise NeoxkoError("torch's int4 weight layout on this CPU could not be read back (it is not a plain "
                          "rearrangement of the values); save the float model and quantize it where it is loaded")
    return q


def _convert_int4(q: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def _nibbles(packed: Tensor) -> Tensor:
    """Every 4-bit slot of a packed tensor, in memory order (low nibble first)."""
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=-1).view(-1).to(torch.int32)


def _probe_positions(n: int, k: int) -> Tensor:
    """For every slot of the converter's output, the flat index (row * k + column) of the element it holds: one
    base-16 digit of the index at a time goes through the converter."""
    index = torch.arange(n * k, dtype=torch.int64)
    found, place = torch.zeros(n * k, dtype=torch.int64), 1
    while place < n * k:
        found += _nibbles(_convert_int4((index // place % 16).to(torch.int32).view(n, k))).long() * place
        place *= 16
    return found


def _kernel_positions(n: int, k: int) -> Tensor:
    """The slot of every element (row-major), if the layout is blocks of rows, each block column by column:
    slot = block start row * k + column * block width + place in the column (read at two small widths)."""
    widths = (32, 64)
    where = []
    for width in widths:  # slot of (row, 0) and (row, 1) at this width
        slot_of = torch.empty(n * width, dtype=torch.int64)
        slot_of[_probe_positions(n, width)] = torch.arange(n * width)
        where.append(slot_of.view(n, width)[:, :2])
    start = (where[1][:, 0] - where[0][:, 0]) // (widths[1] - widths[0])
    place = where[0][:, 0] - start * widths[0]
    step = where[0][:, 1] - where[0][:, 0]
    return ((start * k + place)[:, None] + torch.arange(k)[None, :] * step[:, None]).view(-1)


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
    empty=True only builds the quantized modules (for loading).

    tied_head "float" leaves a head tied to the embedding as it is; "int8" quantizes it too (files
    written before neoxko 0.2 are laid out so)."""
    if getattr(model, "quantized", False):
        return model
    if bits == 4:
        check_int4(model, group_size, "cpu" if empty else next(model.parameters()).device)
        keep = {"embed_out"} if getattr(model.config, "tie_word_embeddings", False) else set()
        for name, linear in [(n, m) for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) and n not in keep and ".lora_" not in n]:
            parent, _, child = name.rpartition(".")
            new = (Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                              linear.weight.dtype, linear.weight.device) if empty
                   else Int4Linear.from_linear(linear, group_size))
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
                             linear.weight.dtype, linear.weight.device)
        else:
            new = Int8Linear.from_linear(linear)
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.quantized = True
    model.tied_head = tied_head if keep or tied_head == "int8" and model.config.tie_word_embeddings else None
    return model
