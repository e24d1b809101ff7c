"""The pretraining loop: one process or many (torchrun), DDP or FSDP2, resumable, logged."""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from neoxko.train import checkpoint
from neoxko.train.build import build_model, build_optimizer
from neoxko.train.config import TrainConfig
from neoxko.train.data import IGNORE, Batches
from neoxko.train.estimate import check_fits, flops_per_token, peak_flops
from neoxko.train.parallel import ParallelDims, apply_ddp, build_mesh, gradient_sync, init_distributed


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr, then cosine down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class Pretraining:
    """What a run trains on and writes, for pretraining: windows of token shards, every token a target, and a
    Hugging Face folder at the end. Fine-tuning (neoxko.finetune.job) brings its own."""

    trainable_only = False  # checkpoints hold every parameter
    signature = None  # what trains, when it is not every parameter of the model (see checkpoint.load)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def setup(self, rank: int) -> None:
        self.tokenizer = tokenizer_for_export(self.cfg)

    def build(self, dims: ParallelDims, mesh, device: torch.device) -> nn.Module:
        return build_model(self.cfg, dims, mesh, device)

    def data(self) -> Batches:
        return Batches(self.cfg.data, self.cfg.data_weights, self.cfg.seq_len, self.cfg.seed)

    def held_out(self, world: int) -> tuple[Batches, int] | None:
        """The held-out batches and how many of them each evaluation runs."""
        if not self.cfg.eval_data:
            return None
        return Batches([self.cfg.eval_data], None, self.cfg.seq_len, self.cfg.seed + 1), self.cfg.eval_batches

    def finish(self, out: Path, rank: int, final: Path, step: int) -> dict:
        return finish(out, self.tokenizer, rank, final, step)


def train(cfg: TrainConfig, job=None) -> dict:
    job = job or Pretraining(cfg)
    # 1. processes, mesh, device
    rank, world, device = init_distributed(cfg.dist_timeout_s)
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dims = ParallelDims.resolve(cfg.parallel, world, ranks_per_node, cfg.dp_replicate, cfg.dp_shard)
    accumulation = cfg.accumulation(world)
    check_fits(cfg, dims, ranks_per_node)
    mesh = build_mesh(dims, device)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")
        print(f"neoxko: {dims}, {accumulation} micro-batch(es) of {cfg.micro_batch} per rank per step, on {device}",
              file=sys.stderr, flush=True)

    job.setup(rank)

    # 2. model (built sharded, never whole), parallelism, optimizer
    model = job.build(dims, mesh, device)
    wrapped = apply_ddp(model, mesh, device) if world > 1 and not dims.sharded else model
    # fused AdamW on plain tensors; FSDP's sharded DTensors keep the default (foreach) implementation
    optimizer = build_optimizer(model, cfg, fused=not dims.sharded)

    # 3. data, resume
    batches = job.data()
    held_out = job.held_out(world)
    start = 0
    if (found := checkpoint.latest(out)) is not None:
        start = checkpoint.load(found, model, optimizer, job.trainable_only, job.signature)
        if rank == 0:
            trim_log(out / "log.jsonl", start)
            print(f"neoxko: resuming from {found} (step {start})", file=sys.stderr, flush=True)
    if start >= cfg.max_steps:  # finished before: export again if that is what failed
        return job.finish(out, rank, found, start)
    stop = StopSignals()  # a scheduler's notice (SIGTERM, SIGUSR1): save and stop after this step
    try:
        # 4. the loop
        log = (out / "log.jsonl").open("a", encoding="utf-8") if rank == 0 else None
        board = _tensorboard(out) if rank == 0 else None
        tokens_per_step = cfg.global_batch * cfg.seq_len
        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", disable=rank != 0)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
        if cfg.bf16 and device.type == "cpu" and rank == 0:
            warn_emulated_bf16()
        last, saved = {}, None
        saver = checkpoint.Checkpointer(out, asynchronous=cfg.async_checkpoint, trainable_only=job.trainable_only,
                                        job=job.signature)
        peak = peak_flops(cfg, device)
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            # dropout (LoRA's) draws from a generator seeded by the step and rank: a resumed run draws the same masks
            torch.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + rank)
            loss_sum = torch.zeros((), device=device)
            # the step's loss is the mean over all its target tokens, on every rank alike: each micro-batch's summed
            # loss is divided by the step's target count (and multiplied by the world size, which the gradient
            # reduction averages over)
            scale = world / batches.target_count(step * cfg.global_batch, cfg.global_batch)
            for micro in range(accumulation):
                first = step * cfg.global_batch + (micro * world + rank) * cfg.micro_batch
                batch = batches.batch(first, cfg.micro_batch).to(device)
                # gradients are reduced once per step, on the last micro-batch
                with gradient_sync(model, wrapped, micro == accumulation - 1, cfg.grad_sync == "micro"):
                    with autocast:
                        loss = batch.loss(wrapped, scale)
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # one all-reduce: the mean loss, and whether any rank was told to stop (all stop together)
            shared = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=device)])
            if world > 1:
                dist.all_reduce(shared)
            stopping = bool(shared[1] > 0)
            seconds = time.perf_counter() - t0
            flops = flops_per_token(model.config, cfg.seq_len) * tokens_per_step / seconds
            last = {"step": step + 1, "loss": shared[0].item() / world, "lr": learning_rate(cfg, step),
                    "grad_norm": _item(grad_norm), "tokens_per_s": tokens_per_step / seconds, "flops_per_s": flops}
            if peak:
                last["mfu"] = flops / (peak * world)
            if held_out is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                last |= evaluate(wrapped, *held_out, cfg, device, rank, world)
            if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                                    or "eval_loss" in last):
                log.write(json.dumps(last) + "\n")
                log.flush()
                if board is not None:
                    for key, value in last.items():
                        if key != "step":
                            board.add_scalar(key, value, step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stopping:
                saved = saver.save(model, optimizer, step + 1)
            if stopping:
                saver.wait()
                if rank == 0:
                    why = stop.name or "a signal to another rank"
                    print(f"\nneoxko: stopped at step {step + 1} ({why}); saved {saved}; run the same command to "
                          "resume", file=sys.stderr, flush=True)
                break
        bar.close()
        saver.wait()
        if log is not None:
            log.close()
            plot_run(out)
        if board is not None:
            board.close()
    finally:
        stop.restore()

    # 5. the final model in Hugging Face format, from the last checkpoint
    if last.get("step") == cfg.max_steps:
        job.finish(out, rank, saved, cfg.max_steps)
    return last


def tokenizer_for_export(cfg: TrainConfig) -> str | None:
    """The tokenizer OUT/model gets: cfg.tokenizer, else the one the first data folder was prepared with.
    Checked now, so that a wrong name fails before training, not at its end."""
    from neoxko.data.shards import prepare_record
    from neoxko.tokenizer import tokenizer_folder

    tokenizer = cfg.tokenizer
    if tokenizer is None and cfg.data:
        tokenizer = (prepare_record(cfg.data[0]) or {}).get("tokenizer")
    if tokenizer is not None:
        tokenizer_folder(tokenizer)
    return tokenizer


def finish(out: Path, tokenizer: str | None, rank: int, final: Path, step: int) -> dict:
    """OUT/model from the final checkpoint (see export_once); returns the last log row."""
    def write(dest: Path) -> None:
        checkpoint.export(final, dest, tokenizer)
        with_tokenizer = f"with the tokenizer of {tokenizer}" if tokenizer else \
            "without a tokenizer (set tokenizer= to add one)"
        print(f"neoxko: wrote the model after step {step} to {dest} (Hugging Face format, {with_tokenizer})",
              file=sys.stderr, flush=True)

    return export_once(out, "model", rank, final, step, write)


def export_once(out: Path, name: str, rank: int, final: Path, step: int, write) -> dict:
    """Rank 0 writes OUT/name with write(dest) from the final checkpoint unless that step's export is there
    (OUT/export.json says which step it holds: a run that finished before exports again only if that failed);
    returns the last log row."""
    record = out / "export.json"
    done = record.is_file() and json.loads(record.read_text()).get("step") == step and (out / name).is_dir()
    if rank == 0 and not done:
        write(out / name)
        record.write_text(json.dumps({"step": step, "checkpoint": final.name, name: name}) + "\n")
    rows = (out / "log.jsonl").read_text(encoding="utf-8").splitlines() if (out / "log.jsonl").is_file() else []
    return json.loads(rows[-1]) if rows else {}


def trim_log(path: Path, step: int) -> None:
    """Drop log rows past the step a run resumes from (steps a killed run did after its last checkpoint,
    which the resumed run does again), so that the log has one row per step."""
    if not path.is_file():
        return
    rows = path.read_text(encoding="utf-8").splitlines()
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.with_suffix(".tmp").write_text("".join(r + "\n" for r in kept), encoding="utf-8")
        os.replace(path.with_suffix(".tmp"), path)


def _item(value: torch.Tensor) -> float:
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


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


def evaluate(model: nn.Module, held_out, n_batches: int, cfg: TrainConfig, device, rank: int, world: int) -> dict:
    """Mean loss per target token and perplexity on the same held-out batches every time."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, target tokens
    with torch.no_grad():
        for i in range(n_batches):
            batch = held_out.batch((i * world + rank) * cfg.micro_batch, cfg.micro_batch).to(device)
            total[0] += batch.loss(model).double()
            total[1] += (batch.targets != IGNORE).sum()
    if world > 1:
        dist.all_reduce(total)
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}


class StopSignals:
    """SIGTERM or SIGUSR1 (a scheduler's preemption or time-limit notice) ends the run after the current step,
    with a checkpoint; restore() puts the previous handlers back. Slurm's srun answers a SIGTERM to itself by
    killing its step, but passes SIGUSR1 on, so `scancel --full` should send USR1."""

    signals = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested, self.name = False, None
        self.previous = {}
        try:
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: the caller handles signals
            self.previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested, self.name = True, signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


def warn_emulated_bf16() -> None:
    """bf16: true on a CPU that has no bf16 arithmetic: it runs, emulated, slower than float32."""
    from neoxko.hardware import detect

    hw = detect()
    if not hw.native_bf16:
        print(f"neoxko: warning: bf16: true on a CPU without native bf16 ({hw.capability}): bf16 matrix products are "
              "emulated there, slower than float32 arithmetic, and save only activation memory; set bf16: false "
              "unless memory is what limits you (neoxko info --hardware says what this CPU has)",
              file=sys.stderr, flush=True)
