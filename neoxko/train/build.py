"""The training model, built so that no rank ever holds it whole: meta device, parallelism, then memory.

Order (torchtitan's): build on the meta device (no memory), wrap blocks for activation checkpointing
and compile, shard with FSDP2 (each rank's parameters become DTensor shards), `to_empty` on the
target device (each rank allocates only its shards), then fill the shards: GPT-NeoX's init or a
Hugging Face checkpoint, one parameter at a time.

Initialisation draws each matrix in fixed blocks of rows, each from its own generator seeded with
(seed, name, block), on the target device, and only the blocks this rank holds: the same seed gives
the same model at any world size and sharding, and no rank draws more than its shard and one block.
"""

import math
import zlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from neoxko.config import ModelConfig
from neoxko.model import GPTNeoX
from neoxko.train.config import TrainConfig
from neoxko.train.names import WRAPPER_PREFIXES, assign, plain_name  # noqa: F401 (re-exported)
from neoxko.train.parallel import ParallelDims, apply_ac, apply_compile, apply_fsdp


def build_model(cfg: TrainConfig, dims: ParallelDims, mesh, device: torch.device, adapt=None, loaded=None) -> GPTNeoX:
    """adapt(model) changes the meta model before it is wrapped and sharded (fine-tuning adds LoRA layers there);
    loaded(model) runs once the weights are in."""
    config = cfg.model_config()
    with torch.device("meta"):
        model = GPTNeoX(config)
    if adapt is not None:
        adapt(model)
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
        if loaded is not None:
            loaded(model)
    return model.train()


def init_weights(model: GPTNeoX, scheme: str, seed: int) -> None:
    """GPT-NeoX's small_init (std sqrt(2 / 5d)) with wang_init (2 / (L sqrt(d))) on the layers that
    write into the residual stream; or transformers' normal(0, initializer_range). Biases 0, LayerNorm 1."""
    c: ModelConfig = model.config
    small = math.sqrt(2 / (5 * c.hidden_size)) if scheme == "small_init" else c.initializer_range
    wang = 2 / (c.num_hidden_layers * math.sqrt(c.hidden_size)) if scheme == "small_init" else small
    for name, param in model.named_parameters():
        name = plain_name(name)
        local = param.to_local() if isinstance(param, DTensor) else param
        if name.endswith("bias"):
            local.zero_()
        elif param.dim() == 1:  # LayerNorm weight
            local.fill_(1.0)
        else:
            std = wang if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else small
            normal_rows(param, local, std, (seed << 32) | zlib.crc32(name.encode()))


def normal_rows(param: nn.Parameter, local: torch.Tensor, std: float, seed: int) -> None:
    """Fill this rank's rows of a normal(0, std) matrix drawn in fixed blocks of rows, block k from
    its own generator seeded (seed, k): the same matrix at any sharding, and never more than one
    block of rows beyond the shard in memory."""
    start, stop = local_rows(param)
    if local.shape[0] != stop - start:  # a layout we do not know: draw whole, keep our part
        full = torch.empty(param.shape, device=local.device).normal_(0.0, std, generator=_generator(local, seed, 0))
        assign(param, full)
        return
    rows = max(1, (1 << 20) // max(math.prod(param.shape[1:]), 1))
    for k in range(start // rows, -(-stop // rows)):
        first, last = k * rows, min((k + 1) * rows, param.shape[0])
        block = torch.empty((last - first, *param.shape[1:]), device=local.device)
        block.normal_(0.0, std, generator=_generator(local, seed, k))
        lo, hi = max(first, start), min(last, stop)
        local[lo - start:hi - start].copy_(block[lo - first:hi - first])


def local_rows(param: nn.Parameter) -> tuple[int, int]:
    """The global rows [start, stop) this rank holds: FSDP2 splits dim 0 like torch.chunk over each
    mesh dimension it shards on."""
    start, stop = 0, param.shape[0]
    if isinstance(param, DTensor):
        for mesh_dim, placement in enumerate(param.placements):
            if placement.is_shard(0):
                n, i = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
                chunk = -(-(stop - start) // n)
                start, stop = min(start + i * chunk, stop), min(start + (i + 1) * chunk, stop)
    return start, stop


def _generator(like: torch.Tensor, seed: int, block: int) -> torch.Generator:
    return torch.Generator(like.device).manual_seed((seed * 1_000_003 + block) % (1 << 63))


def load_weights(model: GPTNeoX, folder: str | Path) -> None:
    """Fill this rank's shards from a Hugging Face folder, reading one tensor at a time."""
    from neoxko.formats.hf import checkpoint_tensors
    from neoxko.formats.locate import resolve

    params = {plain_name(n): p for n, p in model.named_parameters() if ".lora_" not in n}  # (adapters start fresh)
    tied = model.config.tie_word_embeddings
    for name, tensor in checkpoint_tensors(resolve(folder), {n: p.shape for n, p in params.items()}, tied):
        param = params[name]
        assign(param, tensor.to(device=param.device, dtype=param.dtype))


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not on biases and LayerNorm); fused: one kernel per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
