"""`neoxko train` under torchrun, counting gradient reductions: FSDP2's reduce-scatters and DDP's bucket
all-reduces (through a DDP communication hook). Writes {COUNTS}.{rank}.json. A test helper."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from neoxko.train import loop
from neoxko.train.config import TrainConfig

counts = {"reduce_scatter": 0, "hsdp_allreduce": 0, "ddp_allreduce": 0}
_reduce_scatter, _all_reduce = dist.reduce_scatter_single, dist.all_reduce


def counting_reduce_scatter(*args, **kwargs):
    counts["reduce_scatter"] += 1
    return _reduce_scatter(*args, **kwargs)


def counting_all_reduce(*args, **kwargs):
    if kwargs.get("group") is not None:  # FSDP2's all-reduce across replicas (HSDP); the loop's own has none
        counts["hsdp_allreduce"] += 1
    return _all_reduce(*args, **kwargs)


_apply_ddp = loop.apply_ddp


def counting_ddp(*args, **kwargs):
    ddp = _apply_ddp(*args, **kwargs)

    def hook(group, bucket):
        counts["ddp_allreduce"] += 1
        return default_hooks.allreduce_hook(group, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp


dist.reduce_scatter_single, dist.all_reduce = counting_reduce_scatter, counting_all_reduce
loop.apply_ddp = counting_ddp
loop.train(TrainConfig.load(None, sys.argv[1:]))
Path(f"{os.environ['COUNTS']}.{os.environ['RANK']}.json").write_text(json.dumps(counts))
