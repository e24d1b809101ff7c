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


def quantize_model(model: nn.Module, empty: bool = False, tied_head: str = "float") -> nn.Module:
    """Swap every nn.Linear for an Int8Linear, in place; empty=True only builds the modules (for loading).

    tied_head "float" leaves a head tied to the embedding as it is; "int8" quantizes it too (files
    written before neoxko 0.2 are laid out so)."""
    if getattr(model, "quantized", False):
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
