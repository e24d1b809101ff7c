"""FinetuneConfig: TrainConfig's settings (engine, mesh, checkpoints, logging) plus the data, template and method
of instruction fine-tuning, from YAML with key=value overrides."""

from dataclasses import dataclass, field

from neoxko.config import ModelConfig
from neoxko.errors import ConfigError
from neoxko.finetune.data import FORMATS
from neoxko.finetune.lora import TARGETS, LoraSettings
from neoxko.train.config import TrainConfig


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    # model: a Hugging Face folder, a built-in name (ko-small) or a hub id; its weights are the start
    model: str = "ko-small"
    init: str = "checkpoint"
    # data: JSON / JSONL files (alpaca: instruction/input/output; chat: messages; pairs: prompt/response)
    data: list = field(default_factory=list)
    data_format: str = "auto"  # auto (by each row's keys), alpaca, chat or pairs
    eval_data: str | list | None = None  # held-out files; else eval_split of data is held out
    eval_split: float = 0.05
    template: str | None = None  # koalpaca, chat, or a .jinja file (default: koalpaca for alpaca data, else chat)
    system: str | None = None  # a system message put before every alpaca or pairs example
    packing: bool = True  # several examples per row, none attending to another; false: one per row, padded
    overlong: str = "drop"  # an example over seq_len tokens: drop, truncate, or error
    method: str = "lora"  # lora or full
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: list | str = field(default_factory=lambda: ["query_key_value"])
    lora_rslora: bool = False
    # per-layer ranks and alphas, as peft's rank_pattern and alpha_pattern: a layer-name pattern (matched at the end
    # of the layer's name, after a dot) -> its rank / alpha, e.g. {"dense_h_to_4h": 16, "layers.0.attention.dense": 4}
    lora_rank_pattern: dict = field(default_factory=dict)
    lora_alpha_pattern: dict = field(default_factory=dict)
    quantize_base: str | None = None  # int8: LoRA on frozen int8 weights (one process or DDP)
    # training defaults for fine-tuning
    seq_len: int = 512
    micro_batch: int = 4
    global_batch: int = 16
    max_steps: int = 200
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    out_dir: str = "runs/finetune"
    log_every: int = 5
    eval_every: int = 50
    save_every: int = 100

    def __post_init__(self):
        super().__post_init__()
        if self.init != "checkpoint":
            raise ConfigError("fine-tuning starts from a model's weights: init must be checkpoint")
        if self.data_format not in ("auto", *FORMATS):
            raise ConfigError(f"data_format must be auto, {', '.join(FORMATS)}; got {self.data_format!r}")
        if self.overlong not in ("drop", "truncate", "error"):
            raise ConfigError(f"overlong must be drop, truncate or error, got {self.overlong!r}")
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method must be lora or full, got {self.method!r}")
        if self.quantize_base not in (None, "int8"):
            raise ConfigError(f"quantize_base must be int8 or unset, got {self.quantize_base!r}")
        if self.quantize_base and self.method != "lora":
            raise ConfigError("quantize_base: int8 freezes the base weights, so it needs method: lora")
        if self.quantize_base and self.parallel != "ddp":
            raise ConfigError("quantize_base: int8 runs in one process or under DDP; FSDP shards float weights only "
                              "(set parallel: ddp, or drop quantize_base)")
        if isinstance(self.lora_targets, list):
            unknown = [t for t in self.lora_targets if t not in TARGETS]
            if unknown:
                raise ConfigError(f"lora_targets {unknown} are not GPT-NeoX linear layers; choose from "
                                  f"{', '.join(TARGETS)} (or give one regex string)")
        _ = self.lora  # checks r and dropout

    @property
    def lora(self) -> LoraSettings | None:
        if self.method != "lora":
            return None
        targets = self.lora_targets if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, targets, self.lora_rslora,
                            rank_pattern=dict(self.lora_rank_pattern), alpha_pattern=dict(self.lora_alpha_pattern))

    def model_folder(self):
        from neoxko.checkpoint import resolve

        return resolve(self.model)

    def model_config(self) -> ModelConfig:
        from neoxko.checkpoint import read_config

        return read_config(self.model_folder())

    def eval_files(self) -> list:
        if self.eval_data is None:
            return []
        return [self.eval_data] if isinstance(self.eval_data, str) else list(self.eval_data)
