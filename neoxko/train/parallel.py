"""Parallelism as ordered single-purpose functions on PyTorch's own engine (torchrun, DDP, FSDP2)."""

import os

import torch
import torch.distributed as dist
from torch import nn

from neoxko.model import GPTNeoX


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def apply_ac(model: GPTNeoX) -> None:
    """Activation checkpointing per block: recompute activations in backward instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.gpt_neox.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: GPTNeoX) -> None:
    """torch.compile per block: the blocks share one compiled graph."""
    for block in model.gpt_neox.layers:
        block.compile(fullgraph=True)


def apply_fsdp(model: GPTNeoX, bf16: bool) -> None:
    """FSDP2: shard every block, then the rest (embeddings, head), over all ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy else {}
    for block in model.gpt_neox.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
