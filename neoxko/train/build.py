"""The training model, built so that no rank ever holds it whole: meta device, parallelism, then memory.

Order (torchtitan's): build on the meta device (no memory), wrap blocks for activation checkpointing
and compile, shard with FSDP2 (each rank's parameters become DTensor shards), `to_empty` on the
target device (each rank allocates only its shards), then fill the shards: GPT-NeoX's init or a
Hugging Face checkpoint, one parameter at a time.

Initialisation draws each parameter from its own generator seeded with (seed, name), on the target
device, and keeps this rank's slice: the same seed gives the same model at any world size and sharding.
"""

import math
import zlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from neoxko.config import ModelConfig
from neoxko.model import GPTNeoX
from neoxko.train.config import TrainConfig
from neoxko.train.parallel import ParallelDims, apply_ac, apply_compile, apply_fsdp

# Prefixes the wrappers put into parameter names (activation checkpointing, torch.compile).
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def build_model(cfg: TrainConfig, dims: ParallelDims, mesh, device: torch.device) -> GPTNeoX:
    config = cfg.model_config()
    with torch.device("meta"):
        model = GPTNeoX(config)
    if cfg.activation_checkpointing:
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    if dims.sharded:
        apply_fsdp(model, mesh, dims, cfg.bf16)
    model.to_empty(device=device)
    model.setup_rope(device)
    with torch.no_grad():
        if cfg.init == "checkpoint":
            load_weights(model, cfg.model)
        else:
            init_weights(model, cfg.init, cfg.seed)
    return model.train()


def plain_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def init_weights(model: GPTNeoX, scheme: str, seed: int) -> None:
    """GPT-NeoX's small_init (std sqrt(2 / 5d)) with wang_init (2 / (L sqrt(d))) on the layers that
    write into the residual stream; or transformers' normal(0, initializer_range). Biases 0, LayerNorm 1."""
    c: ModelConfig = model.config
    small = math.sqrt(2 / (5 * c.hidden_size)) if scheme == "small_init" else c.initializer_range
    wang = 2 / (c.num_hidden_layers * math.sqrt(c.hidden_size)) if scheme == "small_init" else small
    for name, param in model.named_parameters():
        name = plain_name(name)
        if name.endswith("bias"):
            full = torch.zeros(param.shape, device=param.device)
        elif param.dim() == 1:  # LayerNorm weight
            full = torch.ones(param.shape, device=param.device)
        else:
            std = wang if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else small
            generator = torch.Generator(param.device).manual_seed((seed << 32) | zlib.crc32(name.encode()))
            full = torch.empty(param.shape, device=param.device).normal_(0.0, std, generator=generator)
        assign(param, full)


def load_weights(model: GPTNeoX, folder: str | Path) -> None:
    """Fill this rank's shards from a Hugging Face folder, reading one tensor at a time."""
    from neoxko.checkpoint import checkpoint_tensors, resolve

    params = {plain_name(n): p for n, p in model.named_parameters()}
    tied = model.config.tie_word_embeddings
    for name, tensor in checkpoint_tensors(resolve(folder), {n: p.shape for n, p in params.items()}, tied):
        param = params[name]
        assign(param, tensor.to(device=param.device, dtype=param.dtype))


def assign(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy the full tensor into the parameter, or into this rank's shard of it (no communication)."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not on biases and LayerNorm); fused: one kernel per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
