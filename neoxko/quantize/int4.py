"""Int4 weight-only quantization: Int4Linear, its on-disk layout, and the two kernels behind it."""

import torch
from torch import Tensor, nn

from neoxko import kernels

GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel takes
INT4_METHOD = "neoxko_int4"


def int4_config(group_size: int) -> dict:
    return {"quant_method": INT4_METHOD, "bits": 4, "group_size": group_size,
            "scheme": "weight-only, asymmetric per group of group_size input features: w = (q - 8) * scale + zero, "
                      "q in 0..15",
            "layout": "qweight uint8 (out, in / 2), input feature 2j in the low nibble and 2j + 1 in the high one; "
                      "scales and zeros (out, in / group_size)",
            "scale_dtype": "bfloat16",
            "modules": "every nn.Linear (attention, MLP, embed_out unless tied to the embedding)",
            "readers": "neoxko's own layout, the same on every machine, loaded by neoxko on any CPU; for llama.cpp: "
                       "neoxko export --format gguf"}


class Int4Linear(nn.Module):
    """Weight-only int4 with a scale and a zero per group of group_size input features: w ~= (q - 8) * scale + zero
    with q in 0..15 (asymmetric: zero = min + 8 * scale, scale = (max - min) / 15), so a weight is off by at most
    half a step, (max - min) / 30 of its group's range. A quarter of bf16's bytes per token.

    Two kernels: neoxko's own (neoxko.kernels, activations quantized to int8 per 128 inputs, int8 dot products;
    tile-major nibbles, bf16 scales and zeros) where it is built and the layer fits it (groups of 64-256), else
    torch's _weight_int4pack_mm_for_cpu (nibbles in torch's per-CPU layout, scales_zeros in the model's dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 kernel: bool | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel = _use_kernel(in_features, out_features, group_size, device) if kernel is None else kernel
        self.register_buffer("weight_packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        if self.kernel:
            groups = (out_features, in_features // group_size)
            self.register_buffer("scales", torch.empty(groups, dtype=torch.bfloat16, device=device))
            self.register_buffer("zeros", torch.empty(groups, dtype=torch.bfloat16, device=device))
        else:
            self.register_buffer("scales_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype,
                                                             device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, kernel: bool | None = None) -> "Int4Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.dtype,
                     w.device, kernel)
        # (bf16 scales and zeros on every path: the file, and the numbers, do not depend on the kernels being built)
        q, scales_zeros = quantize_weight_int4(w, group_size, torch.bfloat16)
        module._set(q, scales_zeros[..., 0].t(), scales_zeros[..., 1].t())
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def _set(self, q: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """q (out, in) in 0..15, scales and zeros (out, in / group_size), into this layer's kernel layout."""
        if self.kernel:
            self.weight_packed = kernels.pack_int4(q)
            self.scales, self.zeros = scales.to(torch.bfloat16).contiguous(), zeros.to(torch.bfloat16).contiguous()
        else:
            self.weight_packed = _convert_int4(q.to(torch.int32))
            self.scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()

    def _get(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q, scales, zeros) as _set takes them."""
        if self.kernel:
            return kernels.unpack_int4(self.weight_packed), self.scales, self.zeros
        q = unpack_kernel_layout(self.weight_packed, self.out_features, self.in_features)
        return q, self.scales_zeros[..., 0].t(), self.scales_zeros[..., 1].t()

    def float_weight(self) -> Tensor:
        """The weight these int4 values stand for, (out_features, in_features) in float32."""
        q, scales, zeros = self._get()
        groups = (self.out_features, self.in_features // self.group_size, self.group_size)
        w = (q.float().reshape(groups) - 8) * scales.float()[..., None] + zeros.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if self.kernel and kernels.takes(x):
            return kernels.int4_linear(x, self.weight_packed, self.scales, self.zeros, self.group_size,
                                       self.bias)
        if self.kernel:  # a gradient wanted through the layer: the dequantized weights, in float
            w = kernels.dequantize_int4(self.weight_packed, self.scales, self.zeros, self.group_size, torch.float32)
            return nn.functional.linear(x, w.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)
        sz = self.scales_zeros if self.scales_zeros.dtype == x.dtype else self.scales_zeros.to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).contiguous(), self.weight_packed,
                                                       self.group_size, sz)
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, kernel={'neoxko' if self.kernel else 'torch'}")

    # In a state dict (and so on disk) the weights are in the portable layout, not in a kernel's.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.weight_packed.is_meta:
            qweight = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8, device="meta")
            scales, zeros = ((self.scales, self.zeros) if self.kernel
                             else (self.scales_zeros[..., 0].t(), self.scales_zeros[..., 1].t()))
        else:
            q, scales, zeros = self._get()
            qweight = pack_nibbles(q)
        destination[prefix + "qweight"] = qweight
        destination[prefix + "scales"] = scales.to(torch.bfloat16).contiguous()  # (the same bytes on any machine)
        destination[prefix + "zeros"] = zeros.to(torch.bfloat16).contiguous()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        names = ["qweight", "scales", "zeros"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + name for name in names if prefix + name not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        self._set(unpack_nibbles(state_dict[prefix + "qweight"]), state_dict[prefix + "scales"],
                  state_dict[prefix + "zeros"])
        if self.bias is not None:
            self.bias = nn.Parameter(state_dict[prefix + "bias"], requires_grad=False)


def _use_kernel(in_features: int, out_features: int, group_size: int, device) -> bool:
    on_cpu = device is None or torch.device(device).type in ("cpu", "meta")
    return on_cpu and group_size in kernels.INT4_GROUPS and kernels.eligible(in_features, out_features)


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


def quantize_weight_int4(weight: Tensor, group_size: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """q (out, in) int32 in 0..15 and scales_zeros (in / group_size, out, 2) in dtype (the weight's by default)."""
    dtype = dtype or weight.dtype
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    zero = (low + 8 * scale).to(dtype).float()  # rounded as the kernel will see it, then q fitted to it
    scale = scale.to(dtype).float()
    q = ((w - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32).view(n, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


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


