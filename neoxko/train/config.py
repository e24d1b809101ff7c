"""TrainConfig: everything a pretraining run needs, from YAML with key=value overrides, validated."""

import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from neoxko.config import PRESETS, ModelConfig
from neoxko.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    # model: a preset name, a dict of ModelConfig fields, or a checkpoint folder with init "checkpoint"
    model: str | dict = "polyglot-ko-1.3b"
    init: str = "small_init"  # small_init (GPT-NeoX small_init + wang_init on output layers), normal, checkpoint
    # data: folders of token shards from `neoxko data prepare` (their tokens/ subfolder or the folder itself)
    data: list = field(default_factory=list)
    data_weights: list | None = None  # mixture weights, one per data entry (default: equal)
    eval_data: str | None = None  # held-out shards for validation loss and perplexity
    seq_len: int = 2048
    micro_batch: int = 4  # sequences per forward on one rank
    global_batch: int = 32  # sequences per optimizer step over all ranks; accumulation is derived
    # optimisation
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # execution
    # parallelism under torchrun: ddp (replicate), fsdp (shard over all ranks) or hsdp (shard inside a node,
    # replicate across nodes); dp_replicate / dp_shard set the mesh sizes explicitly (-1: the rest)
    parallel: str = "ddp"
    dp_replicate: int | None = None
    dp_shard: int | None = None
    # FSDP with accumulation: reduce gradients once per step ("step": unsharded gradients are held between
    # micro-steps) or reduce-scatter every micro-step ("micro": sharded gradients, more traffic)
    grad_sync: str = "step"
    dist_timeout_s: float = 600  # rendezvous and collectives; a rank that waits longer fails with a message
    bf16: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    peak_tflops: float | None = None  # per device, for the MFU estimate (known GPUs are looked up)
    device_memory_gb: float | None = None  # per device, for the memory check (default: the GPU's, or RAM / ranks)
    check_memory: bool = True  # refuse a run whose estimated memory exceeds the device's
    # output
    out_dir: str = "runs/train"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    save_every: int = 500
    async_checkpoint: bool = False  # write checkpoints in the background (state staged in host memory)
    tokenizer: str | None = None  # copied next to the final Hugging Face model

    def __post_init__(self):
        if self.init not in ("small_init", "normal", "checkpoint"):
            raise ConfigError(f"init must be small_init, normal or checkpoint, got {self.init!r}")
        if self.parallel not in ("ddp", "fsdp", "hsdp"):
            raise ConfigError(f"parallel must be ddp, fsdp or hsdp, got {self.parallel!r}")
        if self.grad_sync not in ("step", "micro"):
            raise ConfigError(f"grad_sync must be step or micro, got {self.grad_sync!r}")
        for name in ("seq_len", "micro_batch", "global_batch", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.data_weights is not None and len(self.data_weights) != len(self.data):
            raise ConfigError(f"data_weights has {len(self.data_weights)} entries but data has {len(self.data)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per rank per step: global_batch = micro_batch * world_size * accumulation."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch} x "
                f"{world_size} process(es) = {per_step}; change global_batch or micro_batch"
            )
        return self.global_batch // per_step

    def model_config(self) -> ModelConfig:
        if isinstance(self.model, dict):
            return ModelConfig(**self.model)
        if self.model in PRESETS:
            return PRESETS[self.model]
        path = Path(self.model)
        if (path / "config.json").is_file():
            return ModelConfig.from_file(path / "config.json")
        raise ConfigError(f"model {self.model!r} is neither a preset ({', '.join(PRESETS)}), a dict of model "
                          "fields, nor a folder with config.json")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "TrainConfig":
        """Read a YAML file (optional) and apply key=value overrides (values parsed as YAML)."""
        values: dict = {}
        if path is not None:
            try:
                values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"{path} must hold a mapping of settings")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like key=value")
            values[key.strip()] = yaml.safe_load(raw)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        types = {f.name: f.type for f in fields(cls)}
        values = {k: _coerce(k, v, types[k]) for k, v in values.items()}
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"bad setting: {e}") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def _coerce(key: str, value, annotation):
    """YAML reads 3e-4 (no dot) as a string: numbers are taken as the field's type, or refused by name."""
    kinds = set(typing.get_args(annotation)) or {annotation}
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kinds & {int, float} and not isinstance(value, bool) and not (kinds & {str, dict, list}):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if float in kinds:
            return number
        if number != int(number):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        return int(number)
    return value
