"""Parallelism as ordered single-purpose functions over a validated device mesh (torchrun, DDP, FSDP2, HSDP).

The mesh has two data-parallel dimensions, as torchtitan's: `dp_replicate` (whole copies of the model,
e.g. one per node) and `dp_shard` (ranks that split parameters, gradients and optimizer state).
ddp = world x 1, fsdp = 1 x world, hsdp = nodes x ranks-per-node. Every rank is a data-parallel rank.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from neoxko.errors import ConfigError, EveryRankError, NeoxkoError
from neoxko.model import GPTNeoX

RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int

    @classmethod
    def resolve(cls, parallel: str, world: int, local_world: int,
                dp_replicate: int | None = None, dp_shard: int | None = None) -> "ParallelDims":
        """Sizes from the shorthand, overridden by explicit sizes (-1: whatever the world size leaves)."""
        default = {"ddp": (world, 1), "fsdp": (1, world), "hsdp": (world // max(local_world, 1), local_world)}
        if parallel not in default:
            raise ConfigError(f"parallel must be ddp, fsdp or hsdp, got {parallel!r}")
        replicate, shard = default[parallel]
        replicate = replicate if dp_replicate is None else dp_replicate
        shard = shard if dp_shard is None else dp_shard
        if replicate == -1 and shard > 0 and world % shard == 0:
            replicate = world // shard
        if shard == -1 and replicate > 0 and world % replicate == 0:
            shard = world // replicate
        if replicate < 1 or shard < 1 or replicate * shard != world:
            raise ConfigError(
                f"dp_replicate {replicate} x dp_shard {shard} = {replicate * shard}, but the world size is {world} "
                f"({parallel}); choose sizes whose product is the number of processes"
            )
        return cls(replicate, shard)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        return self.dp_shard > 1

    def __str__(self) -> str:
        kind = "single process" if self.world == 1 else "HSDP" if self.sharded and self.dp_replicate > 1 \
            else "FSDP" if self.sharded else "DDP"
        return f"{kind}: dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} = {self.world} rank(s)"


def init_distributed(timeout_s: float = 600) -> tuple[int, int, torch.device]:
    """(rank, world_size, device), with the process group up when there is more than one process.

    Under torchrun each rank takes its LOCAL_RANK's GPU (NCCL), or the CPU (gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_allocation(world)
    device = local_device(local_rank)
    if world > 1 and not dist.is_initialized():
        missing = [v for v in RENDEZVOUS_VARS if v not in os.environ]
        if missing:
            raise NeoxkoError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set; launch with torchrun "
                              "(torchrun --nproc-per-node N -m neoxko train ...) or unset WORLD_SIZE")
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, dist.DistError) as e:
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise NeoxkoError(
                f"rank {rank} of {world} could not join the rendezvous at {where} within {timeout_s:g} s "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); check that every node was launched "
                "with the same --rdzv-endpoint and --nnodes, and that the port is open") from None
    return rank, world, device


def check_allocation(world: int) -> None:
    """Under Slurm, the ranks a launcher starts on a node must fit what the allocation gives that node, and the
    launchers must span the allocation's nodes (a GPU shared by two ranks, or idle nodes, is a sizing mistake)."""
    if "SLURM_JOB_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return
    ranks = int(os.environ["LOCAL_WORLD_SIZE"])
    node = os.environ.get("SLURMD_NODENAME", "this node")
    if torch.cuda.is_available() and ranks > torch.cuda.device_count():
        raise EveryRankError(f"{ranks} ranks a node (--nproc-per-node) but {node} has {torch.cuda.device_count()} "
                             "GPU(s) in this allocation; set NPROC to --gpus-per-node")
    cpus = int(os.environ.get("SLURM_CPUS_ON_NODE", ranks))
    if not torch.cuda.is_available() and ranks > cpus:
        raise EveryRankError(f"{ranks} ranks a node (--nproc-per-node) but the allocation gives {node} {cpus} CPU(s) "
                             f"(SLURM_CPUS_ON_NODE); set NPROC to at most {cpus}, or ask for more with --cpus-per-task")
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "0"))
    if nodes and world != ranks * nodes:
        raise EveryRankError(f"{world} ranks in all, but the allocation has {nodes} node(s) x {ranks} ranks = "
                             f"{ranks * nodes}; launch one torchrun a node with --nnodes \"$SLURM_NNODES\"")


def local_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def build_mesh(dims: ParallelDims, device: torch.device):
    """A 2-D mesh (dp_replicate, dp_shard); None in a single process."""
    if dims.world == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dims.dp_replicate, dims.dp_shard),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


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


def apply_fsdp(model: GPTNeoX, mesh, dims: ParallelDims, bf16: bool) -> None:
    """FSDP2 over dp_shard (HSDP when dp_replicate > 1): every block, then the root (embeddings, head).

    bf16: parameters gathered and computed in bf16, gradients reduced in fp32; the sharded master
    weights and the optimizer stay fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    for block in model.gpt_neox.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def apply_ddp(model: nn.Module, mesh, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # Gradients live in the communication buckets (no second copy of them).
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   device_mesh=mesh["dp_replicate"], gradient_as_bucket_view=True)


def gradient_sync(model: nn.Module, wrapped: nn.Module, sync: bool, every_micro_step: bool = False):
    """A context for one micro-step's forward and backward: gradients are reduced only when sync.

    FSDP2 skips its reduce-scatter (and HSDP's all-reduce) until the last micro-step, holding the
    unsharded gradients meanwhile; every_micro_step reduce-scatters each micro-step instead (sharded
    gradients, more traffic) and still all-reduces across replicas once. DDP uses no_sync.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        if every_micro_step:
            model.set_requires_gradient_sync(True)
            model.set_requires_all_reduce(sync)
        else:
            model.set_requires_gradient_sync(sync)
        return nullcontext()
    if wrapped is not model and not sync:
        return wrapped.no_sync()
    return nullcontext()
