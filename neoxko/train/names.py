"""Parameter names under the wrappers that training puts around layers, and filling a parameter (or this rank's shard
of it) from a full tensor: shared by the training build, its checkpoints and LoRA, with no import of either."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Prefixes the wrappers put into parameter names (activation checkpointing, torch.compile, LoRA).
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "base_layer.")  # (the last: LoRA's wrapper)


def plain_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def assign(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy the full tensor into the parameter, or into this rank's shard of it (no communication)."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)
