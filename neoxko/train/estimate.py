"""What a training config costs before it runs: per-rank memory, FLOPs per step, expected speed (`--dry-run`).

Memory per rank, with P parameters sharded over dp_shard ranks (fp32 master weights, AdamW):
  parameters 4P/S, gradients 4P/S, optimizer 8P/S;
  FSDP also holds the gathered root (embeddings, head) and two gathered blocks (the current and the
  prefetched one) in the compute dtype, and the largest unit's unsharded fp32 gradients and
  reduce-scatter input while it reduces; with accumulation and grad_sync "step" the unsharded
  gradients of every parameter (4P) wait between micro-steps for the one reduction; on CPU, gloo's
  reduce-scatter copies its input once more;
  activations per token saved for backward (measured on this model with saved-tensor hooks, fp32 /
  bf16 autocast): 72 / 38 bytes x d per layer; with activation checkpointing 4 bytes x d per layer
  plus one block recomputed in backward; the head 8 bytes x d + 4 bytes per vocabulary entry, and
  8 bytes per entry for the logits' gradient. bf16 autocast over fp32 weights (no FSDP) also keeps a
  bf16 copy of every weight it multiplies, 2 bytes per parameter, until backward.
"""

import os
from dataclasses import dataclass

import torch

from neoxko.config import ModelConfig
from neoxko.errors import ConfigError
from neoxko.train.config import TrainConfig
from neoxko.train.parallel import ParallelDims

GB = 1e9
ASSUMED_MFU = 0.4
# Dense bf16 peak FLOP/s per device, for the MFU estimate.
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
# Bytes x hidden_size per token per layer saved for backward (fp32, bf16 autocast), and with checkpointing.
LAYER_ACT = {False: 72, True: 38}
LAYER_AC = 4
HEAD_ACT_D, HEAD_ACT_V, LOGITS_GRAD_V = 8, 4, 8


@dataclass(frozen=True)
class MemoryPlan:
    parameters: float
    gradients: float
    optimizer: float
    gathered: float
    accumulated: float
    activations: float

    @property
    def states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.accumulated + self.activations


def block_parameters(c: ModelConfig) -> int:
    d, f = c.hidden_size, c.intermediate_size
    bias = 1 if c.attention_bias else 0
    return 4 * d * d + 4 * d * bias + 2 * d * f + f + d + 4 * d  # attention, MLP, two LayerNorms


def estimate_memory(cfg: TrainConfig, dims: ParallelDims, device: torch.device | None = None) -> MemoryPlan:
    """device None: the GPU when there is one, else the CPU."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = cfg.model_config()
    P, S = c.num_parameters, dims.dp_shard
    compute_bytes = 2 if cfg.bf16 else 4
    gathered = accumulated = 0.0
    if dims.sharded:
        block = block_parameters(c)
        root = P - c.num_hidden_layers * block
        reduce_copies = 2 if device.type == "cuda" else 3
        gathered = (root + 2 * block) * compute_bytes + 4 * reduce_copies * max(root, block)
        if cfg.accumulation(dims.world) > 1 and cfg.grad_sync == "step":
            accumulated = 4 * P
    activations = saved_activations(cfg, dims) + backward_transient(cfg, dims)
    return MemoryPlan(4 * P / S, 4 * P / S, 8 * P / S, gathered, accumulated, activations)


def saved_activations(cfg: TrainConfig, dims: ParallelDims) -> float:
    """Bytes the forward pass of one micro-batch keeps for backward."""
    c = cfg.model_config()
    tokens, d, L, V = cfg.micro_batch * cfg.seq_len, c.hidden_size, c.num_hidden_layers, c.vocab_size
    per_layer = LAYER_AC if cfg.activation_checkpointing else LAYER_ACT[cfg.bf16]
    saved = tokens * (d * (L * per_layer + HEAD_ACT_D) + V * HEAD_ACT_V)
    if cfg.bf16 and not dims.sharded:  # autocast's bf16 copies of the fp32 weights
        saved += 2 * (V * d + (0 if cfg.activation_checkpointing else L * block_parameters(c)))
    return saved


def backward_transient(cfg: TrainConfig, dims: ParallelDims) -> float:
    """Bytes backward adds on top: the logits' gradient, and one recomputed block under checkpointing."""
    c = cfg.model_config()
    tokens = cfg.micro_batch * cfg.seq_len
    # the logits' gradient; a new embedding or head gradient before it is added into .grad
    transient = tokens * c.vocab_size * LOGITS_GRAD_V + 4 * c.vocab_size * c.hidden_size / dims.dp_shard
    if cfg.activation_checkpointing:
        transient += tokens * LAYER_ACT[cfg.bf16] * c.hidden_size
        transient += 2 * block_parameters(c) if cfg.bf16 and not dims.sharded else 0
    return transient


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters (without embeddings) + attention scores (12 L d T)."""
    body = c.num_parameters - c.vocab_size * c.hidden_size
    return 6 * body + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def training_seconds(cfg: TrainConfig, world: int, peak: float, mfu: float) -> float:
    """Seconds for the whole run: max_steps x global_batch x seq_len tokens at mfu of world x peak FLOP/s."""
    tokens = cfg.max_steps * cfg.global_batch * cfg.seq_len
    return tokens * flops_per_token(cfg.model_config(), cfg.seq_len) / (world * peak * mfu)


def peak_flops(cfg: TrainConfig, device: torch.device | None = None) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device is not None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16.items() if k in name), None)
    return None


def device_memory(cfg: TrainConfig, ranks_per_node: int) -> tuple[float, str]:
    """Bytes one rank may use, and where the figure comes from."""
    if cfg.device_memory_gb:
        return cfg.device_memory_gb * GB, "device_memory_gb"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / max(ranks_per_node, 1), f"this machine's RAM / {ranks_per_node} rank(s)"


def check_fits(cfg: TrainConfig, dims: ParallelDims, ranks_per_node: int) -> None:
    """Refuse a run whose estimated per-rank memory is over the device's, naming the numbers."""
    plan = estimate_memory(cfg, dims)
    limit, source = device_memory(cfg, ranks_per_node)
    if cfg.check_memory and plan.total > limit:
        raise ConfigError(
            f"this run needs about {plan.total / GB:.1f} GB per rank (states {plan.states / GB:.1f}, activations "
            f"{plan.activations / GB:.1f} at micro_batch {cfg.micro_batch} x seq_len {cfg.seq_len}) but "
            f"{limit / GB:.1f} GB is available ({source}); lower micro_batch or seq_len, set "
            "activation_checkpointing=true, shard over more ranks"
            + (", set grad_sync=micro" if plan.accumulated else "") + ", or set check_memory=false to try anyway"
        )


def dry_run(cfg: TrainConfig, world: int, ranks_per_node: int) -> str:
    """The plan as text: mesh, per-rank memory, FLOPs per step, expected tokens/s and days; raises if it cannot fit."""
    c = cfg.model_config()
    dims = ParallelDims.resolve(cfg.parallel, world, ranks_per_node, cfg.dp_replicate, cfg.dp_shard)
    accumulation = cfg.accumulation(world)
    plan = estimate_memory(cfg, dims)
    limit, source = device_memory(cfg, ranks_per_node)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    step_flops = flops_per_token(c, cfg.seq_len) * tokens_per_step
    peak = peak_flops(cfg, torch.device("cuda") if torch.cuda.is_available() else None)
    lines = [
        f"model        {c.num_parameters:,} parameters, {c.num_hidden_layers} layers, d {c.hidden_size}",
        f"mesh         {dims}",
        f"batch        {cfg.global_batch} x {cfg.seq_len} tokens per step = micro {cfg.micro_batch} x {world} "
        f"rank(s) x accumulation {accumulation}",
        "memory per rank (GB):",
        f"  parameters {plan.parameters / GB:10.2f}",
        f"  gradients  {plan.gradients / GB:10.2f}",
        f"  optimizer  {plan.optimizer / GB:10.2f}",
        f"  gathered   {plan.gathered / GB:10.2f}   (FSDP: root + 2 blocks unsharded, reduce buffers)",
        f"  accumulate {plan.accumulated / GB:10.2f}   (FSDP, grad_sync {cfg.grad_sync}: unsharded gradients "
        "between micro-steps)",
        f"  activations{plan.activations / GB:10.2f}   (micro-batch {cfg.micro_batch}, "
        f"checkpointing {'on' if cfg.activation_checkpointing else 'off'}, {'bf16' if cfg.bf16 else 'fp32'})",
        f"  total      {plan.total / GB:10.2f}   of {limit / GB:.1f} available ({source})",
        f"FLOPs        {step_flops:.3e} per step ({flops_per_token(c, cfg.seq_len) / 1e9:.2f} GFLOP per token)",
    ]
    run = f"run          {cfg.max_steps:,} steps = {cfg.max_steps * tokens_per_step / 1e9:,.1f}B tokens"
    if peak:
        rate = peak * world * ASSUMED_MFU / flops_per_token(c, cfg.seq_len)
        lines.append(f"expected     {rate:,.0f} tokens/s over {world} rank(s) at {ASSUMED_MFU:.0%} MFU of "
                     f"{peak / 1e12:.0f} TFLOP/s each; {tokens_per_step / rate:.2f} s per step")
        days = {mfu: training_seconds(cfg, world, peak, mfu) / 86400 for mfu in (ASSUMED_MFU, 1.0)}
        lines.append(f"{run}: {days[ASSUMED_MFU]:.2f} days ({days[ASSUMED_MFU] * 24:.1f} h) at {ASSUMED_MFU:.0%} "
                     f"MFU; {days[1.0]:.2f} days at the full {peak / 1e12:.0f} TFLOP/s peak (the bound)")
    else:
        lines.append("expected     unknown speed: set peak_tflops (per device) for a tokens/s estimate")
        lines.append(f"{run}; days unknown without peak_tflops")
    check_fits(cfg, dims, ranks_per_node)
    lines.append("fits         yes")
    return "\n".join(lines)
