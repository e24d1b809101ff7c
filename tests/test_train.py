"""Pretraining: loss goes down, DDP equals accumulation, resume equals uninterrupted, bad configs and checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neoxko.errors import CheckpointError, ConfigError, NeoxkoError
from neoxko.tokenizer import load_tokenizer
from neoxko.train.config import TrainConfig
from neoxko.train.loop import train

TINY = {"vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}


def settings(shards: Path, out: Path, **changes) -> dict:
    base = dict(model=TINY, data=[str(shards)], eval_data=str(shards), seq_len=32, micro_batch=2, global_batch=4,
                max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=5, out_dir=str(out), log_every=1, save_every=10,
                eval_every=10, eval_batches=2)
    return base | changes


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").open()]


def test_loss_goes_down_and_the_model_is_exported(shards, tmp_path, tokenizer_dir):
    last = train(TrainConfig(**settings(shards, tmp_path, tokenizer=str(tokenizer_dir))))
    history = losses(tmp_path)
    assert len(history) == 30 and np.mean(history[-5:]) < np.mean(history[:5]) - 1.0
    assert "eval_perplexity" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1]) or last
    from neoxko import generate, load_model

    model = load_model(tmp_path / "model")
    assert generate(model, load_tokenizer(tmp_path / "model"), "대한민국", 5)  # loads and runs
    assert (tmp_path / "loss.png").stat().st_size > 1000
    out = subprocess.run([sys.executable, "-m", "neoxko", "plot", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("loss.png")
    out = subprocess.run([sys.executable, "-m", "neoxko", "plot", str(tmp_path / "nope")], capture_output=True, text=True)
    assert out.returncode == 2 and "has no log.jsonl" in out.stderr


def test_activation_checkpointing_gives_the_same_losses_and_bf16_runs(shards, tmp_path):
    plain = settings(shards, tmp_path / "plain", max_steps=4, eval_every=0)
    train(TrainConfig(**plain))
    train(TrainConfig(**plain | {"out_dir": str(tmp_path / "ac"), "activation_checkpointing": True}))
    assert losses(tmp_path / "ac") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    last = train(TrainConfig(**plain | {"out_dir": str(tmp_path / "bf16"), "bf16": True}))
    assert abs(last["loss"] - losses(tmp_path / "plain")[-1]) < 0.1


def test_mfu_is_logged_against_a_given_peak(shards, tmp_path):
    last = train(TrainConfig(**settings(shards, tmp_path, max_steps=2, eval_every=0, peak_tflops=1.0)))
    assert last["mfu"] == pytest.approx(last["flops_per_s"] / 1e12)


def test_the_signal_handlers_train_sets_are_restored_when_it_returns(shards, tmp_path):
    import signal

    mine = lambda signum, frame: None  # noqa: E731
    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        train(TrainConfig(**settings(shards, tmp_path, max_steps=2, eval_every=0)))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_tensorboard_when_installed(shards, tmp_path):
    pytest.importorskip("tensorboard")
    train(TrainConfig(**settings(shards, tmp_path, max_steps=2, eval_every=0)))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(shards, tmp_path):
    full = settings(shards, tmp_path / "full", max_steps=200, eval_every=0, save_every=1000)
    train(TrainConfig(**full))
    cut = full | {"out_dir": str(tmp_path / "cut")}
    proc = subprocess.Popen([sys.executable, "-m", "neoxko", "train", *_overrides(cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 5) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # a preemption: the run saves after this step and exits
    assert proc.wait(60) == 0
    done = len(log.read_text().splitlines())
    assert done < 200, "the run ended before the signal"
    train(TrainConfig(**cut))
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_async_checkpoints_resume_like_synchronous_ones(shards, tmp_path):
    cfg = settings(shards, tmp_path / "async", max_steps=6, save_every=2, eval_every=0, async_checkpoint=True)
    train(TrainConfig(**cfg))
    checkpoints = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000004", "step-0000006"]
    first = losses(tmp_path / "async")
    (checkpoints / "latest").write_text("step-0000004\n")  # as if the run had been killed after step 5
    train(TrainConfig(**cfg))
    assert losses(tmp_path / "async") == pytest.approx(first, abs=1e-6)  # steps 5-6 done again, logged once


def test_corrupted_partial_and_foreign_checkpoints_are_refused(shards, tmp_path):
    cfg = TrainConfig(**settings(shards, tmp_path, max_steps=4, save_every=2, eval_every=0))
    train(cfg)
    step = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert step.name == "step-0000004" and (tmp_path / "checkpoints" / "step-0000002").is_dir()
    longer = TrainConfig(**settings(shards, tmp_path, max_steps=6, save_every=2, eval_every=0))
    other = TrainConfig(**settings(shards, tmp_path, max_steps=6, eval_every=0, model=TINY | {"hidden_size": 64}))
    with pytest.raises(CheckpointError, match="is of another model: hidden_size 32 \\(run: 64\\)"):
        train(other)
    shard = next(step.glob("__0_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupted: __0_0.distcp do\\(es\\) not match the digests"):
        train(longer)
    (step / "meta.json").write_text('{"format": "neoxko-dcp-1", "step": 4}')
    with pytest.raises(CheckpointError, match="lacks model_config, files \\(or holds the wrong type\\)"):
        train(longer)
    (step / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="is incomplete"):
        train(longer)
    (tmp_path / "checkpoints" / "latest").write_text("step-0000009\n")
    with pytest.raises(CheckpointError, match="names step-0000009, which is missing"):
        train(longer)
    (tmp_path / "checkpoints" / "latest").write_text("../../elsewhere/step-0000002\n")
    with pytest.raises(CheckpointError, match="not a checkpoint name like step-0000100"):
        train(longer)


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) learning_rate"):
        TrainConfig.load(None, ["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="global_batch 6 is not a multiple of micro_batch 4 x 1 process"):
        TrainConfig.load(None, ["global_batch=6", "micro_batch=4"]).accumulation(1)
    (tmp_path / "c.yaml").write_text("seq_len: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        TrainConfig.load(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        TrainConfig.load(None, ["lr"])
    out = subprocess.run([sys.executable, "-m", "neoxko", "train", "global_batch=7"], capture_output=True, text=True,
                         env={**os.environ, "WORLD_SIZE": "1"})
    assert out.returncode == 2 and "global_batch 7 is not a multiple" in out.stderr


def test_bad_data_and_model_settings(shards, tmp_path):
    from neoxko.errors import NeoxkoError

    with pytest.raises(NeoxkoError, match="no training data"):
        train(TrainConfig(**settings(shards, tmp_path / "a", data=[], eval_data=None)))
    with pytest.raises(NeoxkoError, match="no shard in .* holds more than seq_len \\+ 1"):
        train(TrainConfig(**settings(shards, tmp_path / "b", seq_len=50000, model=TINY | {"max_position_embeddings": 65536})))
    with pytest.raises(NeoxkoError, match="data_weights must be non-negative and not all zero"):
        train(TrainConfig(**settings(shards, tmp_path / "c", data_weights=[0.0])))
    with pytest.raises(ConfigError, match="data_weights has 2 entries but data has 1"):
        TrainConfig(**settings(shards, tmp_path / "d", data_weights=[1.0, 1.0]))
    with pytest.raises(ConfigError, match="model 'polyglot-ko-99b' is neither a preset"):
        TrainConfig(model="polyglot-ko-99b").model_config()


def test_shipped_recipes_are_valid_configs():
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    from neoxko.finetune.config import FinetuneConfig

    for recipe in recipes:  # a fine-tuning recipe says `neoxko finetune` in its header
        kind = FinetuneConfig if "neoxko finetune" in recipe.read_text(encoding="utf-8") else TrainConfig
        cfg = kind.load(recipe)
        assert cfg.model_config().num_parameters > 0
        assert cfg.accumulation(1) >= 1


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_estimate_matches_what_backward_keeps(bf16, checkpointing):
    """--dry-run's activation bytes against the tensors autograd saves, on a shape the constants were not fitted on."""
    import torch
    import torch.nn.functional as F

    from neoxko.train.build import build_model
    from neoxko.train.estimate import saved_activations
    from neoxko.train.parallel import ParallelDims

    model = {"vocab_size": 1000, "hidden_size": 384, "num_hidden_layers": 3, "num_attention_heads": 6,
             "intermediate_size": 1536, "max_position_embeddings": 96}
    cfg = TrainConfig(model=model, seq_len=96, micro_batch=3, global_batch=3, bf16=bf16,
                      activation_checkpointing=checkpointing)
    net = build_model(cfg, ParallelDims(1, 1), None, torch.device("cpu"))
    held = {p.untyped_storage().data_ptr() for p in net.parameters()} | \
        {b.untyped_storage().data_ptr() for b in net.buffers()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, 1000, (3, 96))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
    measured = sum(n for ptr, n in saved.items() if ptr not in held)
    assert saved_activations(cfg, ParallelDims(1, 1)) == pytest.approx(measured, rel=0.1)


def test_state_estimate_is_exact_and_dry_run_refuses_what_cannot_fit(shards, tmp_path):
    import torch

    from neoxko.train.build import build_model, build_optimizer
    from neoxko.train.estimate import estimate_memory
    from neoxko.train.parallel import ParallelDims

    cfg = TrainConfig(**settings(shards, tmp_path, model=TINY | {"num_hidden_layers": 3}))
    net = build_model(cfg, ParallelDims(1, 1), None, torch.device("cpu"))
    optimizer = build_optimizer(net, cfg)
    net(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    plan = estimate_memory(cfg, ParallelDims(1, 1))
    assert plan.parameters == nbytes(net.parameters()) and plan.gradients == nbytes(p.grad for p in net.parameters())
    assert plan.optimizer == nbytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    assert estimate_memory(cfg, ParallelDims(1, 2)).states == pytest.approx(plan.states / 2)

    recipe = str(Path(__file__).parents[1] / "recipes" / "polyglot-ko-1.3b.yaml")
    ok = subprocess.run([sys.executable, "-m", "neoxko", "train", "--config", recipe, "--dry-run", "--world-size",
                         "8", "device_memory_gb=80", "peak_tflops=312"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "FSDP: dp_replicate 1 x dp_shard 8 = 8 rank(s)" in ok.stdout and "accumulation 16" in ok.stdout
    assert "8.83 GFLOP per token" in ok.stdout and "113,079 tokens/s" in ok.stdout and "fits         yes" in ok.stdout
    big = subprocess.run([sys.executable, "-m", "neoxko", "train", "--config", recipe, "--dry-run", "--world-size",
                          "8", "device_memory_gb=80", "model=polyglot-ko-12.8b", "parallel=ddp"],
                         capture_output=True, text=True)
    assert big.returncode == 2 and "this run needs about 366.5 GB per rank" in big.stderr
    assert "80.0 GB is available (device_memory_gb)" in big.stderr and "Traceback" not in big.stderr


def test_the_exported_model_gets_a_tokenizer_by_name_or_from_the_data(shards, tmp_path):
    cfg = settings(shards, tmp_path / "named", max_steps=1, eval_every=0, tokenizer="ko-small",
                   model=TINY | {"vocab_size": 30080})
    train(TrainConfig(**cfg))
    assert load_tokenizer(tmp_path / "named" / "model").vocab_size == load_tokenizer("ko-small").vocab_size
    data = tmp_path / "prepared"
    (data / "tokens").mkdir(parents=True)
    for f in shards.iterdir():
        (data / "tokens" / f.name).write_bytes(f.read_bytes())
    (data / "prepare.json").write_text(json.dumps({"tokenizer": "ko-small"}))
    train(TrainConfig(**cfg | {"tokenizer": None, "data": [str(data)], "out_dir": str(tmp_path / "from_data")}))
    assert (tmp_path / "from_data" / "model" / "tokenizer.json").is_file()
    with pytest.raises(NeoxkoError, match="no/such/tokenizer/here: no such folder"):
        train(TrainConfig(**cfg | {"tokenizer": "no/such/tokenizer/here", "out_dir": str(tmp_path / "bad")}))
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before training


def test_a_tied_head_stays_tied_in_training_and_the_export_is_the_trained_model(shards, tmp_path):
    """Built on the meta device and moved with to_empty, a tied model once got a head of its own: trained apart
    from the embedding and dropped at export. The head is the embedding, in training and in the export."""
    import torch
    import torch.nn.functional as F

    from neoxko import load_model
    from neoxko.train.build import build_model
    from neoxko.train.data import Batches
    from neoxko.train.parallel import ParallelDims

    cfg = TrainConfig(**settings(shards, tmp_path, model=TINY | {"tie_word_embeddings": True}, max_steps=6,
                                 eval_every=0))
    model = build_model(cfg, ParallelDims(1, 1), None, torch.device("cpu"))
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight
    last = train(cfg)
    batch = Batches([str(shards)], None, 32, 0).batch(0, 4)
    exported = load_model(tmp_path / "model")
    with torch.no_grad():
        loss = F.cross_entropy(exported(batch.inputs).flatten(0, 1), batch.targets.flatten()).item()
    assert loss < losses(tmp_path)[0] - 0.3  # the export learned what training learned
    assert last["step"] == 6
