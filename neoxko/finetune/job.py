"""Fine-tuning as a job of the training loop (neoxko.train.loop.train): what it trains on, which parameters
train, and what it writes at the end. Everything else, one process or torchrun, DDP or FSDP2, checkpoints,
resume, SIGTERM, logging, is the pretraining engine's.

Output: OUT/adapter (LoRA, peft's layout, with the tokenizer and its chat_template) or OUT/model (full, a
Hugging Face folder whose tokenizer_config.json holds the chat_template), and OUT/data.json (the counts).
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from neoxko.finetune.config import FinetuneConfig
from neoxko.finetune.data import (
    DataError,
    InstructionBatches,
    detect_format,
    encode,
    fit,
    read_examples,
    rows,
    split_held_out,
)
from neoxko.finetune.lora import apply_lora, init_lora, is_lora_key, lora_layers, save_adapter
from neoxko.quantize import quantize_model
from neoxko.train import checkpoint
from neoxko.train.build import build_model
from neoxko.train.loop import export_once


class Finetuning:
    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.trainable_only = cfg.method == "lora"
        self.signature = {"method": cfg.method}  # what trains, in every checkpoint's meta.json, checked on resume
        if (lora := cfg.lora) is not None:
            targets = lora.targets if isinstance(lora.targets, str) else sorted(lora.targets)
            self.signature |= {"lora_r": lora.r, "lora_targets": targets, "quantize_base": cfg.quantize_base}
            if lora.rank_pattern or lora.alpha_pattern:  # (absent from runs before per-layer ranks: they resume)
                self.signature |= {"lora_rank_pattern": dict(lora.rank_pattern),
                                   "lora_alpha_pattern": dict(lora.alpha_pattern)}

    def setup(self, rank: int) -> None:
        from neoxko.chat_template import load_template
        from neoxko.tokenizer import load_tokenizer

        cfg = self.cfg
        if not cfg.data:
            raise DataError("no fine-tuning data: set data to one or more JSON / JSONL files")
        self.tokenizer = load_tokenizer(cfg.model)
        examples = read_examples(cfg.data, cfg.data_format, cfg.system)
        if cfg.eval_files():
            train, held = examples, read_examples(cfg.eval_files(), cfg.data_format, cfg.system)
        else:
            train, held = split_held_out(examples, cfg.eval_split, cfg.seed)
        self.template_name = cfg.template or ("koalpaca" if _format(cfg) == "alpaca" else "chat")
        self.template = load_template(self.template_name)[0]
        pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        rows, report = {}, {"template": self.template_name, "format": _format(cfg)}
        for name, part, shuffle in (("train", train, True), ("held_out", held, False)):
            kept, counts = fit([encode(e, self.template, self.tokenizer) for e in part], cfg.seq_len, cfg.overlong)
            if name == "train" and not kept:
                raise DataError(f"none of the {len(part)} training examples fits in seq_len {cfg.seq_len} tokens")
            rows[name] = InstructionBatches(kept, cfg.seq_len, pad, cfg.packing, cfg.seed, shuffle) if kept else None
            report[name] = counts | {"rows": len(rows[name]) if kept else 0,
                                     "target_tokens": int(rows[name].target_counts.sum()) if kept else 0}
        self.rows, self.report = rows, report
        if rank == 0:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "data.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            t = report["train"]
            epochs = cfg.max_steps * cfg.global_batch / max(t["rows"], 1)
            print(f"neoxko: {t['examples']} training examples ({report['held_out']['examples']} held out) in "
                  f"{t['rows']} {'packed ' if cfg.packing else ''}row(s) of up to {cfg.seq_len} tokens, "
                  f"{t['target_tokens']:,} answer tokens; {cfg.max_steps} steps = {epochs:.2f} epoch(s); "
                  f"template {self.template_name}", file=sys.stderr, flush=True)
            for part in ("train", "held_out"):
                c = report[part]
                if c["overlong"]:
                    print(f"neoxko: {c['overlong']} {part.replace('_', '-')} example(s) longer than seq_len "
                          f"{cfg.seq_len} ({cfg.overlong}; first: {c['first_overlong']})", file=sys.stderr, flush=True)

    def build(self, dims, mesh, device: torch.device) -> nn.Module:
        cfg, lora = self.cfg, self.cfg.lora

        def adapt(model):  # on the meta device, before any memory is allocated
            apply_lora(model, lora)
            if cfg.bf16 and not dims.sharded and not cfg.quantize_base:
                frozen_to_bf16(model)  # frozen weights need no float32 master copy: loaded straight into bf16

        def loaded(model):
            init_lora(model, cfg.seed)
            if cfg.quantize_base == "int8":  # QLoRA's idea with int8: the frozen linear layers, not the adapters
                quantize_model(model, kernel=False)  # row-major: the backward to the adapters reads the weights

        model = build_model(cfg, dims, mesh, device, adapt if lora else None, loaded if lora else None)
        if int(os.environ.get("RANK", "0")) == 0:
            total = sum(p.numel() for p in model.parameters())
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            what = f"LoRA r {lora.r} on {len(lora_layers(model))} layers" if lora else "full fine-tuning"
            print(f"neoxko: {what}: {trained:,} of {total:,} parameters train ({100 * trained / total:.3f}%)",
                  file=sys.stderr, flush=True)
        return model

    def data(self) -> InstructionBatches:
        return self.rows["train"]

    def held_out(self, world: int):
        held = self.rows["held_out"]
        if held is None:
            return None
        return held, math.ceil(len(held) / (self.cfg.micro_batch * world))

    def finish(self, out: Path, rank: int, final: Path, step: int) -> dict:
        """Rank 0 writes OUT/adapter (LoRA) or OUT/model (full) from the final checkpoint, once per step."""
        from neoxko.chat_template import write_chat_template
        from neoxko.tokenizer import copy_tokenizer_files

        name = "adapter" if self.cfg.method == "lora" else "model"

        def write(dest: Path) -> None:  # into a hidden folder first: the folder appears complete or not at all
            tmp = dest.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if self.cfg.method == "lora":
                export_adapter(final, tmp, self.cfg)
                copy_tokenizer_files(self.tokenizer.source, tmp)
            else:
                checkpoint.export(final, tmp, self.tokenizer.source)
            write_chat_template(tmp, self.template)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            print(f"neoxko: wrote the {name} after step {step} to {dest} (chat template {self.template_name})",
                  file=sys.stderr, flush=True)

        return export_once(out, name, rank, final, step, write)


def _format(cfg: FinetuneConfig) -> str:
    """The data's format: as set, or that of the first file's first row."""
    if cfg.data_format != "auto":
        return cfg.data_format
    return detect_format(next(rows(Path(cfg.data[0])))[1])


def frozen_to_bf16(model: nn.Module) -> None:
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)


def export_adapter(folder: Path, dest: Path, cfg: FinetuneConfig) -> Path:
    """The adapter of a LoRA run's checkpoint, read in this process alone, written in peft's format."""

    from neoxko.config import ModelConfig
    from neoxko.model import GPTNeoX

    meta = checkpoint.read_meta(folder)
    checkpoint.verify(folder, meta, alone=True)
    with torch.device("meta"):
        model = GPTNeoX(ModelConfig.from_hf(meta["model_config"]))
        apply_lora(model, cfg.lora)
    model.to_empty(device="cpu")
    state = {"model": {k: v for k, v in model.state_dict().items() if is_lora_key(k)}}
    checkpoint.read_state(folder, state)  # DCP's metadata through the restricted unpickler
    return save_adapter(state["model"], cfg.lora, dest, base_model=str(cfg.model))
