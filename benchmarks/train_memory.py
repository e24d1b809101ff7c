"""Per-rank memory of FSDP training on this CPU at world 1, 2 and 4 (torchrun, gloo), against `--dry-run`.

A ~300M-parameter GPT-NeoX is built as `neoxko train` builds it (meta device, fully_shard, to_empty,
init by row blocks) and trained for two steps. Per rank it prints:
  - states: the bytes of this rank's parameters, gradients and AdamW state (counted from the tensors),
    and the dry-run's figure for them;
  - construction: the peak resident memory while building, above the process's baseline, against
    this rank's shard of the parameters plus one block;
  - step: the peak resident memory of a training step above the baseline, against the dry-run total.

    python benchmarks/train_memory.py [--hidden 1024] [--layers 20] [--seq-len 64] [--worlds 1,2,4]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1e9


def rss_peak() -> int:
    """VmHWM: the process's peak resident set, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from neoxko.train.build import build_model, build_optimizer
    from neoxko.train.config import TrainConfig
    from neoxko.train.estimate import block_parameters, estimate_memory
    from neoxko.train.parallel import ParallelDims, build_mesh, init_distributed

    cfg = TrainConfig(**json.loads(args.worker))
    rank, world, device = init_distributed()
    dims = ParallelDims.resolve("fsdp", world, world)
    mesh = build_mesh(dims, device)
    # the same path once on a tiny model first, so that code loaded on first use is not counted
    tiny = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
            "intermediate_size": 128, "max_position_embeddings": 16}
    build_model(TrainConfig(**json.loads(args.worker) | {"model": tiny}), dims, mesh, device)
    reset_rss_peak()
    baseline = rss_peak()
    model = build_model(cfg, dims, mesh, device)
    construction = rss_peak() - baseline
    optimizer = build_optimizer(model, cfg, fused=not dims.sharded)
    accumulation = cfg.accumulation(world)
    for _ in range(2):
        for micro in range(accumulation):
            x = torch.randint(0, model.config.vocab_size, (cfg.micro_batch, cfg.seq_len + 1))
            if dims.sharded:
                model.set_requires_gradient_sync(micro == accumulation - 1)
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated, as during the next backward
    step_peak = rss_peak() - baseline

    def nbytes(tensors) -> int:
        return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)

    states = nbytes(model.parameters()) + nbytes(p.grad for p in model.parameters()) + \
        nbytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    plan = estimate_memory(cfg, dims, device)
    block = block_parameters(model.config) * 4
    row = {"rank": rank, "world": world, "states": states, "plan_states": plan.states, "construction": construction,
           "shard_plus_block": plan.parameters + block, "step": step_peak, "plan_total": plan.total}
    Path(f"{os.environ['RESULTS']}.{rank}.json").write_text(json.dumps(row))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from neoxko.config import ModelConfig

    model = {"vocab_size": 30080, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
             "num_attention_heads": args.hidden // 64, "intermediate_size": 4 * args.hidden,
             "max_position_embeddings": args.seq_len}
    worlds = [int(w) for w in args.worlds.split(",")]
    cfg = {"model": model, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
           "global_batch": args.micro_batch * max(worlds), "parallel": "fsdp"}
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{_cpu_flags()}; model {ModelConfig(**model).num_parameters / 1e6:.0f}M parameters, fp32, "
          f"micro-batch {args.micro_batch} x {args.seq_len} tokens, AdamW")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            results = Path(tmp) / f"w{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
                   str(29700 + world), __file__, "--worker", json.dumps(cfg)]
            subprocess.run(cmd, check=True, env={**os.environ, "RESULTS": str(results)}, stderr=subprocess.DEVNULL)
            rows += [json.loads(Path(f"{results}.{r}.json").read_text()) for r in range(world)]
    one = next(r["states"] for r in rows if r["world"] == 1) if 1 in worlds else None
    print("\n| world | rank | states GB | dry-run states GB | vs world 1 | construction peak GB | shard + one block GB "
          "| step peak GB | dry-run total GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['states'] / one:.2f}x" if one else "-"
        print(f"| {r['world']} | {r['rank']} | {r['states'] / GB:.3f} | {r['plan_states'] / GB:.3f} | {ratio} | "
              f"{r['construction'] / GB:.3f} | {r['shard_plus_block'] / GB:.3f} | {r['step'] / GB:.2f} | "
              f"{r['plan_total'] / GB:.2f} |")


def _cpu_flags() -> str:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return "flags " + (", ".join(have) or "none of avx2/avx512")


if __name__ == "__main__":
    main()
