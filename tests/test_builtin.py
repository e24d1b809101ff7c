"""The built-in model, ko-small: shipped in the package, the default of every command, a real Korean LM."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxko import load_model, load_tokenizer
from neoxko.checkpoint import BUILTIN
from neoxko.evaluate.perplexity import perplexity

FOLDER = BUILTIN["ko-small"]
HELDOUT = Path(__file__).parent / "fixtures" / "ko_heldout.jsonl"


def neoxko(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neoxko", *args], capture_output=True, text=True)


def hangul_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("가" <= c <= "힣" for c in letters) / max(1, len(letters))


def test_shipped_files_and_card():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "train.yaml", "results.json"):
        assert (FOLDER / name).is_file(), name
    assert (FOLDER / "model.safetensors").stat().st_size < 60e6  # tens of MB at most
    results = json.loads((FOLDER / "results.json").read_text(encoding="utf-8"))
    card = (FOLDER / "README.md").read_text(encoding="utf-8")
    model_ppl, unigram_ppl = results["heldout_ppl"]["bfloat16"]["perplexity"], results["unigram_ppl"]["perplexity"]
    assert f"{model_ppl:.1f}" in card and f"{unigram_ppl:.1f}" in card
    assert model_ppl * 10 < unigram_ppl  # beats the unigram baseline by a wide margin
    tokenizer = load_tokenizer("ko-small")
    assert [tokenizer.token_to_id(t) for t in ("<|acc|>", "<|tel|>", "<|rrn|>")] == [30000, 30001, 30002]


def test_heldout_perplexity_and_the_use_of_context():
    model, tokenizer = load_model("ko-small"), load_tokenizer("ko-small")
    ids = []
    for line in HELDOUT.open(encoding="utf-8"):
        ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eos_id]
    tokens = np.array(ids)
    got = perplexity(model, tokens, seq_len=512, progress=False)
    shuffled = perplexity(model, np.random.default_rng(0).permutation(tokens), seq_len=512, progress=False)
    assert got["perplexity"] < 300  # measured 188.6; a uniform guess is 30,080, the unigram baseline about 5,500
    assert shuffled["perplexity"] > 5 * got["perplexity"]  # the same tokens out of order: context matters


def test_commands_default_to_it():
    out = neoxko("generate", "--max-new-tokens", "16", "--temperature", "0", "대한민국의 수도는")
    assert out.returncode == 0, out.stderr
    assert hangul_share(out.stdout) > 0.5
    info = neoxko("info", "--json")
    assert json.loads(info.stdout)["model"] == "ko-small"
    kobest = Path(__file__).parent / "fixtures" / "kobest"
    ev = neoxko("eval", "--tasks", "kobest_copa", "--shots", "0", "--limit", "4", "--data-dir", str(kobest))
    assert ev.returncode == 0, ev.stderr
    assert "# KoBEST: ko-small" in ev.stdout and "| copa |" in ev.stdout


def test_loads_in_transformers_with_the_same_logits():
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    ours = load_model("ko-small", dtype="float32")
    idx = torch.tensor([load_tokenizer("ko-small").encode("오늘은 날씨가 맑고 바람이 분다")])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)
