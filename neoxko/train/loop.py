"""The pretraining loop: one process or many (torchrun), DDP or FSDP2, resumable, logged."""

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from neoxko.config import ModelConfig
from neoxko.model import GPTNeoX
from neoxko.train import checkpoint
from neoxko.train.config import TrainConfig
from neoxko.train.data import Batches
from neoxko.train.parallel import apply_ac, apply_compile, apply_ddp, apply_fsdp, init_distributed


def build_model(cfg: TrainConfig, device: torch.device) -> GPTNeoX:
    if cfg.init == "checkpoint":
        from neoxko.checkpoint import load_model

        return load_model(cfg.model, dtype=torch.float32, device=device).train()
    model = GPTNeoX(cfg.model_config()).to(device)
    init_weights(model, cfg.init)
    return model.train()


def init_weights(model: GPTNeoX, scheme: str) -> None:
    """GPT-NeoX's small_init (std sqrt(2 / 5d)) with wang_init (2 / (L sqrt(d))) on the layers that
    write into the residual stream; or transformers' normal(0, initializer_range)."""
    c: ModelConfig = model.config
    small = math.sqrt(2 / (5 * c.hidden_size)) if scheme == "small_init" else c.initializer_range
    wang = 2 / (c.num_hidden_layers * math.sqrt(c.hidden_size)) if scheme == "small_init" else small
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            std = wang if name.endswith(("attention.dense", "dense_4h_to_h")) else small
            nn.init.normal_(module.weight, 0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not on biases and LayerNorm); fused: one kernel per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr, then cosine down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: TrainConfig) -> dict:
    # 1. processes, devices, seeds
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed)
    accumulation = cfg.accumulation(world)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")

    # 2. model, parallelism, optimizer
    model = build_model(cfg, device)
    if cfg.activation_checkpointing:
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    wrapped: nn.Module = model
    if world > 1:
        if cfg.parallel == "fsdp":
            apply_fsdp(model, cfg.bf16)
        else:
            wrapped = apply_ddp(model, device)
    # fused AdamW on plain tensors; FSDP's sharded DTensors keep the default (foreach) implementation
    optimizer = build_optimizer(model, cfg, fused=not (world > 1 and cfg.parallel == "fsdp"))

    # 3. data, resume
    batches = Batches(cfg.data, cfg.data_weights, cfg.seq_len, cfg.seed)
    held_out = Batches([cfg.eval_data], None, cfg.seq_len, cfg.seed + 1) if cfg.eval_data else None
    start = 0
    if (found := checkpoint.latest(out)) is not None:
        start = checkpoint.load(found, model, optimizer)
    stop = _stop_on_sigterm()

    # 4. the loop
    log = (out / "log.jsonl").open("a", encoding="utf-8") if rank == 0 else None
    board = _tensorboard(out) if rank == 0 else None
    tokens_per_step = cfg.global_batch * cfg.seq_len
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", disable=rank != 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    step, last = start, {}
    peak = peak_flops(cfg, device)
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accumulation):
            first = step * cfg.global_batch + (micro * world + rank) * cfg.micro_batch
            x, y = (t.to(device) for t in batches.batch(first, cfg.micro_batch))
            sync = nullcontext() if micro == accumulation - 1 or world == 1 or cfg.parallel == "fsdp" \
                else wrapped.no_sync()
            with sync, autocast:
                loss = F.cross_entropy(wrapped(x).float().flatten(0, 1), y.flatten()) / accumulation
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        seconds = time.perf_counter() - t0
        flops = flops_per_token(model.config, cfg.seq_len) * tokens_per_step / seconds
        last = {"step": step + 1, "loss": loss_sum.item(), "lr": learning_rate(cfg, step),
                "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_step / seconds, "flops_per_s": flops}
        if peak:
            last["mfu"] = flops / (peak * world)
        if held_out is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            last |= evaluate(wrapped, held_out, cfg, device, rank, world)
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps or "eval_loss" in last):
            log.write(json.dumps(last) + "\n")
            log.flush()
            if board is not None:
                for key, value in last.items():
                    if key != "step":
                        board.add_scalar(key, value, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop():
            checkpoint.save(out, model, optimizer, step + 1, rank)
        if stop():
            break
    bar.close()

    # 5. the final model in Hugging Face format
    if step + 1 == cfg.max_steps:
        export(out, model, cfg, rank)
    if log is not None:
        log.close()
        plot_run(out)
    if board is not None:
        board.close()
    return last


def _tensorboard(out: Path):
    """A TensorBoard writer into OUT/tensorboard when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def plot_run(out: Path) -> Path | None:
    """OUT/loss.png: training loss (and held-out loss) against step; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "log.jsonl").open(encoding="utf-8")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    held = [r for r in rows if "eval_loss" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return out / "loss.png"


def evaluate(model: nn.Module, held_out: Batches, cfg: TrainConfig, device, rank: int, world: int) -> dict:
    """Mean loss and perplexity on the same held-out windows every time."""
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            x, y = (t.to(device) for t in held_out.batch((i * world + rank) * cfg.micro_batch, cfg.micro_batch))
            total += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    model.train()
    loss = total.item() / cfg.eval_batches
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}


def export(out: Path, model: GPTNeoX, cfg: TrainConfig, rank: int) -> None:
    """Write OUT/model: config.json + safetensors (and the tokenizer), loadable by transformers."""
    from neoxko.checkpoint import save_model
    from neoxko.tokenizer import copy_tokenizer_files

    state = checkpoint.get_model_state_dict(model, options=checkpoint.FULL)
    if rank != 0:
        return
    with torch.device("meta"):
        plain = GPTNeoX(model.config)
    plain.load_state_dict(state, assign=True)
    plain.setup_rope("cpu")
    save_model(plain, out / "model")
    if cfg.tokenizer:
        copy_tokenizer_files(cfg.tokenizer, out / "model")


# Dense bf16 peak FLOP/s per device, for the MFU estimate.
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16.items() if k in name), None)
    return None


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters (without embeddings) + attention scores (12 L d T)."""
    body = c.num_parameters - c.vocab_size * c.hidden_size
    return 6 * body + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def _stop_on_sigterm():
    """A SIGTERM (a scheduler's preemption) ends the run after the current step, with a checkpoint."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return lambda: False
    return lambda: flag["stop"]
