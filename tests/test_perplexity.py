"""Held-out perplexity over token shards and the unigram baseline, against direct computation."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from neoxko.errors import NeoxkoError
from neoxko.evaluate.perplexity import perplexity, stream_tokens, unigram_perplexity


def write_shard(folder, name, tokens):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens, dtype="<u2").tofile(folder / f"{name}.ds")
    np.asarray([len(tokens)], dtype="<u8").tofile(folder / f"{name}.ds.index")


def test_perplexity_predicts_every_token_once(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "held", "a", rng.integers(0, 384, 50))
    write_shard(tmp_path / "held", "b", rng.integers(0, 384, 23))
    model = random_model(tiny_config()).eval()
    tokens = stream_tokens(tmp_path / "held")
    got = perplexity(model, tokens, seq_len=16, batch_size=2, progress=False)
    assert got["tokens"] == 72
    total = 0.0
    with torch.no_grad():
        for start in range(0, 72, 16):  # windows of 17 overlapping by one; the last one is short
            window = torch.from_numpy(tokens[start:start + 17])[None]
            total += F.cross_entropy(model(window[:, :-1])[0], window[0, 1:], reduction="sum").item()
    assert got["loss"] == pytest.approx(total / 72, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / 72), rel=1e-5)


def test_unigram_baseline(tmp_path):
    write_shard(tmp_path / "train" / "tokens", "a", [1, 1, 1, 2])
    held = np.array([5, 1, 2, 3])
    got = unigram_perplexity([tmp_path / "train"], held, vocab_size=4)
    p = {1: 4 / 8, 2: 2 / 8, 3: 1 / 8}  # add-one: (count + 1) / (4 + 4)
    assert got["loss"] == pytest.approx(-(math.log(p[1]) + math.log(p[2]) + math.log(p[3])) / 3)
    assert got["train_tokens"] == 4


def test_tokens_outside_the_vocabulary_are_refused(tmp_path):
    write_shard(tmp_path, "a", [1, 2, 999, 3])
    with pytest.raises(NeoxkoError, match="token id 999, outside the model's vocabulary of 384"):
        perplexity(random_model(tiny_config()), stream_tokens(tmp_path), seq_len=8, progress=False)
    with pytest.raises(NeoxkoError, match="longer than the model's context"):
        perplexity(random_model(tiny_config()), stream_tokens(tmp_path), seq_len=1000, progress=False)


def test_perplexity_command(model_dir, tmp_path):
    write_shard(tmp_path / "held", "a", list(range(4, 100)))
    write_shard(tmp_path / "train", "a", list(range(4, 300)))
    run = subprocess.run([sys.executable, "-m", "neoxko", "perplexity", str(tmp_path / "held"), "--model",
                          str(model_dir), "--train-data", str(tmp_path / "train"), "--seq-len", "32", "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["model_ppl"]["tokens"] == result["unigram_ppl"]["tokens"] == 95
    missing = subprocess.run([sys.executable, "-m", "neoxko", "perplexity", str(tmp_path / "none"), "--model",
                              str(model_dir)], capture_output=True, text=True)
    assert missing.returncode == 2 and "no token shards (*.ds)" in missing.stderr
    assert "not checked that" in run.stderr  # no prepare.json beside these shards


def test_data_from_another_tokenizer_is_refused(model_dir, tmp_path):
    write_shard(tmp_path / "run" / "heldout" / "tokens", "a", list(range(4, 100)))
    cmd = [sys.executable, "-m", "neoxko", "perplexity", str(tmp_path / "run" / "heldout"), "--model", str(model_dir),
           "--seq-len", "32", "--json"]
    (tmp_path / "run" / "prepare.json").write_text(json.dumps({"tokenizer": "ko-small"}))
    other = subprocess.run(cmd, capture_output=True, text=True)
    assert other.returncode == 2 and "which is not the model's tokenizer" in other.stderr
    (tmp_path / "run" / "prepare.json").write_text(json.dumps({"tokenizer": str(model_dir)}))
    same = subprocess.run(cmd, capture_output=True, text=True)
    assert same.returncode == 0 and "not checked" not in same.stderr, same.stderr
