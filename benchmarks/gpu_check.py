"""The prepared GPU check: one command of at most ~10 minutes that a machine with a GPU runs as it is.

    python benchmarks/gpu_check.py [--steps 8] [--micro-batch 4] [--seq-len 2048] [--json OUT.json]

It prints one table:
  1. bf16 FSDP2 training steps of the polyglot-ko-1.3b preset on one GPU, built as `neoxko train` builds
     it (meta device, fully_shard with bf16 params / fp32 reduction, to_empty, init): tokens/s, MFU
     against the GPU's bf16 peak, peak memory against the `--dry-run` estimate;
  2. which SDPA backend the training attention ran (flash, memory-efficient, cuDNN or math);
  3. a tiny model trained 5 steps in fp32 on CPU and on the GPU from the same weights: the largest
     loss difference;
  4. batch-1 and batch-8 greedy decode tokens/s of the 1.3B shape in bf16, neoxko and transformers;
  5. KoBEST scoring speed (documents/s), five tasks at 5 shots, up to 100 documents each.
Without a GPU it says so and exits 0 (`--cpu-smoke` runs every section on the CPU with a tiny model,
to check the script itself).
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 30080, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 256}


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "memory_gb": round(props.total_memory / 1e9, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}


def train_fsdp(model_name: str | dict, steps: int, micro_batch: int, seq_len: int, device: torch.device) -> dict:
    """bf16 FSDP2 steps on one rank (a 1 x 1 mesh), the loop's own pieces, random tokens."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from neoxko.model import GPTNeoX
    from neoxko.train.build import build_optimizer, init_weights
    from neoxko.train.config import TrainConfig
    from neoxko.train.estimate import estimate_memory, flops_per_token, peak_flops
    from neoxko.train.parallel import ParallelDims, apply_fsdp

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29977")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    cfg = TrainConfig(model=model_name, seq_len=seq_len, micro_batch=micro_batch, global_batch=micro_batch,
                      bf16=True, parallel="fsdp")
    dims = ParallelDims(1, 1)
    mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
    # build_model shards only when dp_shard > 1; here FSDP2 is applied on the 1 x 1 mesh to run its bf16 path
    with torch.device("meta"):
        model = GPTNeoX(cfg.model_config())
    apply_fsdp(model, mesh, dims, bf16=True)
    model.to_empty(device=device)
    model.setup_rope(device)
    with torch.no_grad():
        init_weights(model, "small_init", 0)
    optimizer = build_optimizer(model, cfg)
    vocab = model.config.vocab_size
    backend = sdpa_backend(model, micro_batch, seq_len, vocab, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps + 2):  # two warm-up steps
        x = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]
    tokens = micro_batch * seq_len
    flops = flops_per_token(model.config, seq_len) * tokens / seconds
    peak = peak_flops(cfg, device)
    # unsharded states, plus the FSDP path's gathered buffers and activations
    sharded = estimate_memory(dataclasses.replace(cfg, global_batch=2 * micro_batch), ParallelDims(1, 2), device)
    planned = estimate_memory(cfg, dims, device).states + sharded.gathered + sharded.activations
    measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return {"tokens_per_s": tokens / seconds, "tflops": flops / 1e12, "mfu": flops / peak if peak else None,
            "peak_memory_gb": measured / 1e9, "dry_run_gb": planned / 1e9, "sdpa": backend,
            "loss_first_last": [losses[0], losses[-1]]}


def sdpa_backend(model, micro_batch: int, seq_len: int, vocab: int, device: torch.device) -> str:
    """The SDPA kernel the forward uses, read from the profiler."""
    from torch.profiler import profile

    x = torch.randint(0, vocab, (micro_batch, seq_len), device=device)
    with profile() as prof, torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(x)
    names = {e.key for e in prof.key_averages()}
    for kernel, label in (("flash", "flash"), ("efficient", "memory-efficient"), ("cudnn", "cuDNN")):
        if any(f"_scaled_dot_product_{kernel}" in n for n in names):
            return label
    return "math"


def cpu_vs_gpu_losses(device: torch.device, steps: int = 5) -> float:
    """Largest |loss_cpu - loss_gpu| over a few fp32 AdamW steps of a tiny model from the same weights."""
    from neoxko.model import GPTNeoX
    from neoxko.train.build import init_weights

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from neoxko.config import ModelConfig

    cpu = GPTNeoX(ModelConfig(**TINY))
    with torch.no_grad():
        init_weights(cpu, "small_init", 0)
    gpu = copy.deepcopy(cpu).to(device)
    gpu.setup_rope(device)
    data = torch.randint(0, TINY["vocab_size"], (steps, 4, 65), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (cpu, gpu)]
    for batch in data:
        ls = []
        for model, opt, dev in ((cpu, opts[0], "cpu"), (gpu, opts[1], device)):
            b = batch.to(dev)
            loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            ls.append(loss.item())
        worst = max(worst, abs(ls[0] - ls[1]))
    return worst


def decode_speed(config_name: str | dict, device: torch.device, new_tokens: int = 64) -> dict:
    """Greedy decode tokens/s (64-token prompt), neoxko against transformers, bf16, same random weights."""
    import transformers

    from neoxko.generate import generate_tokens

    ours = random_bf16_model(config_name, device)
    config = ours.config
    hf = transformers.GPTNeoXForCausalLM._from_config(transformers.GPTNeoXConfig(**config.to_hf()),
                                                      dtype=torch.bfloat16).to(device).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    out = {}
    for batch in (1, 8):
        prompts = torch.randint(0, config.vocab_size, (batch, 64), generator=torch.Generator().manual_seed(batch))

        def ours_run(n, prompts=prompts):
            list(generate_tokens(ours, prompts.tolist(), n))

        def hf_run(n, prompts=prompts):
            p = prompts.to(device)
            with torch.inference_mode():
                hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)

        for name, fn in (("neoxko", ours_run), ("transformers", hf_run)):
            fn(2)
            decode = timed(lambda f=fn: f(new_tokens + 1), device) - timed(lambda f=fn: f(1), device)
            out[f"{name}_b{batch}"] = batch * new_tokens / decode
    return out


def kobest_speed(config_name: str | dict, device: torch.device, data_dir: Path) -> dict:
    """Documents/s scoring the five KoBEST tasks at 5 shots with the 1.3B shape (random weights)."""
    from neoxko.checkpoint import BUILTIN
    from neoxko.evaluate.kobest import EvalSettings, evaluate
    from neoxko.evaluate.scoring import NeoxkoScorer
    from neoxko.tokenizer import load_tokenizer

    model = random_bf16_model(config_name, device)
    scorer = NeoxkoScorer(model, load_tokenizer(BUILTIN["ko-small"]), batch_tokens=16384)
    tasks = ["kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg"]
    settings = EvalSettings(tasks=tasks, shots=[5], data_dir=str(data_dir), limit=100)
    evaluate(scorer, settings, progress=False)  # warm-up
    sync(device)
    t = time.perf_counter()
    results, samples = evaluate(scorer, settings, progress=False)
    sync(device)
    return {"kobest_5shot_docs_per_s": len(samples) / (time.perf_counter() - t), "docs": len(samples),
            "data": str(data_dir)}


def random_bf16_model(config_name: str | dict, device: torch.device):
    """A preset (or a dict of fields) with normal(0, 0.02) weights in bf16 on the device, built there directly."""
    from neoxko.config import PRESETS, ModelConfig
    from neoxko.model import GPTNeoX

    config = PRESETS[config_name] if isinstance(config_name, str) else ModelConfig(**config_name)
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(torch.bfloat16).eval()
    model.setup_rope(device)
    return model


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section(name: str, fn, results: dict) -> None:
    """Run one section; a failure is reported in the table and the others still run."""
    t = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # a check script: report every section, whatever breaks
        results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    results[name + "_seconds"] = round(time.perf_counter() - t, 1)
    print(f"gpu_check: {name} done in {results[name + '_seconds']} s", file=sys.stderr, flush=True)


def table(results: dict) -> str:
    rows = ["| check | result |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        rows.append(f"| {key} | {value} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", default=None, help="also write the results here")
    shared = ROOT.parent / "shared" / "kobest" / "kobest_v1"
    fixtures = ROOT / "tests" / "fixtures" / "kobest"
    parser.add_argument("--data-dir", default=str(shared if shared.is_dir() else fixtures),
                        help="KoBEST data (default: ../shared/kobest/kobest_v1, else the test fixtures)")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section on the CPU with a tiny model")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_check: no GPU on this machine (torch.cuda.is_available() is False); nothing to check")
        return 0
    device = torch.device("cuda", 0) if not args.cpu_smoke else torch.device("cpu")
    model = "polyglot-ko-1.3b" if not args.cpu_smoke else TINY
    steps, micro, seq = (args.steps, args.micro_batch, args.seq_len) if not args.cpu_smoke else (2, 2, 128)
    machine = gpu_info() if device.type == "cuda" else {"cpu": "smoke test", "torch": torch.__version__}
    results: dict = {"machine": machine}
    section("train_fsdp_bf16", lambda: train_fsdp(model, steps, micro, seq, device), results)
    section("cpu_vs_gpu_max_loss_diff", lambda: {"abs": cpu_vs_gpu_losses(device)}, results)
    section("decode_bf16_tok_per_s", lambda: decode_speed(model, device), results)
    section("kobest_scoring", lambda: kobest_speed(model, device, Path(args.data_dir)), results)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
