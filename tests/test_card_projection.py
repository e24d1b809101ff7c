"""The card's training run planned on this CPU: `neoxko train --dry-run` of recipes/polyglot-ko-1.3b-card.yaml."""

import re
from pathlib import Path

import pytest

from neoxko.cli import main

CARD_RECIPE = str(Path(__file__).parents[1] / "recipes" / "polyglot-ko-1.3b-card.yaml")
CARD_PARAMETERS = 1_331_810_304  # the card's n_parameters
CARD_TOKENS = 102_000 * 1024 * 2048  # steps x global batch x sequence: the card's "213 billion tokens"
A100_BF16 = 312e12
GPUS = 256


def dry_run(capsys, *overrides: str) -> str:
    argv = ["train", "--config", CARD_RECIPE, "--dry-run", "--world-size", str(GPUS), "--ranks-per-node", "8"]
    assert main(argv + list(overrides)) == 0
    return capsys.readouterr().out


def six_n_d_days(mfu: float) -> float:
    """Days from the rule of thumb 6 x parameters x tokens, independent of neoxko's FLOP count."""
    return 6 * CARD_PARAMETERS * CARD_TOKENS / (GPUS * A100_BF16 * mfu) / 86400


def test_the_card_run_fits_an_a100_40gb_and_takes_days_close_to_six_n_d(capsys):
    out = dry_run(capsys)
    assert "HSDP: dp_replicate 32 x dp_shard 8 = 256 rank(s)" in out and "micro 4 x 256 rank(s) x accumulation 1" in out
    total_gb, available_gb = map(float, re.search(r"total\s+([\d.]+)\s+of ([\d.]+) available", out).groups())
    assert available_gb == 40.0 and 10 < total_gb < 40 and "fits         yes" in out
    m = re.search(r"run\s+102,000 steps = ([\d.]+)B tokens: ([\d.]+) days \(([\d.]+) h\) at (\d+)% MFU; "
                  r"([\d.]+) days at the full 312 TFLOP/s peak", out)
    assert m, out
    tokens_b, days, hours, mfu_percent, days_at_peak = (float(g) for g in m.groups())
    assert tokens_b == pytest.approx(CARD_TOKENS / 1e9, abs=0.05) and hours == pytest.approx(days * 24, abs=0.15)
    mfu = mfu_percent / 100
    # neoxko counts 6 x non-embedding parameters plus attention (12 L d T): ~10% over 6ND for this model
    assert 1.0 <= days / six_n_d_days(mfu) <= 1.2
    assert 1.0 <= days_at_peak / six_n_d_days(1.0) <= 1.2
    assert days_at_peak == pytest.approx(days * mfu, rel=0.03)


def test_without_a_peak_the_dry_run_says_the_days_are_unknown(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU to look the peak up from
    out = dry_run(capsys, "peak_tflops=null")
    assert "run          102,000 steps = 213.9B tokens; days unknown without peak_tflops" in out
