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


def test_ko_small_chat_is_an_adapter_peft_loads_and_chat_answers_with_it():
    """The built-in chat model: a peft-format LoRA adapter on ko-small with the chat template; peft on transformers
    gives our logits, and a chat request gets a short Korean answer that ends by itself."""
    from neoxko.chat_template import render, tokenizer_template
    from neoxko.generate import Sampling, generate

    folder = BUILTIN["ko-small-chat"]
    card = (folder / "README.md").read_text(encoding="utf-8")
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    loss = results["answer_loss"]
    assert loss["ko-small-chat"]["loss"] < loss["ko-small"]["loss"] - 1.0  # held-out answers, before and after
    assert f"{loss['ko-small-chat']['loss']:.3f}" in card
    model, tok = load_model("ko-small-chat", dtype="float32"), load_tokenizer("ko-small-chat")
    template = tokenizer_template(tok.source)
    assert "### 어시스턴트:" in template
    prompt = render(template, [{"role": "user", "content": "오늘 너무 피곤해"}], True, eos_token=tok.eos_token)
    ids = torch.tensor([tok.encode(prompt)])
    from neoxko.generate import generate_tokens

    out = [int(t[0]) for t in generate_tokens(model, [ids[0].tolist()], 48, Sampling(temperature=0), eos_id=tok.eos_id)]
    assert out[-1] == tok.eos_id and 2 < len(out) < 48  # a short answer, ended by the model itself
    assert hangul_share(generate(model, tok, prompt, 48, Sampling(temperature=0))) > 0.8
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, folder).eval()(ids).logits
        assert (theirs - model(ids)).abs().max() < 1e-3
