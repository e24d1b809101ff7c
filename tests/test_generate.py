"""Generation: parity with transformers' generate, sampling settings, streaming, stop strings, errors."""

import re

import pytest
import torch

from conftest import KOREAN_TEXT, SHARED, hf_twin, random_model, tiny_config
from neoxko.errors import GenerationError
from neoxko.generate import (
    Sampling,
    StopStrings,
    apply_repetition_penalty,
    generate,
    generate_tokens,
    sample,
    stream,
)
from neoxko.tokenizer import load_tokenizer


def tokens(model, prompts, n, sampling=None, eos_id=None):
    steps = generate_tokens(model, prompts, n, sampling or Sampling(), eos_id)
    return torch.stack(list(steps), dim=1).tolist()


@pytest.mark.parametrize("heads", [4, 1])
def test_greedy_equals_transformers_generate(heads):
    """heads=1: one head of 64, so decoding attends through neoxko's attention kernel where it is built."""
    model = random_model(tiny_config(num_attention_heads=heads))
    hf = hf_twin(model)
    prompt = torch.randint(3, 384, (1, 11))
    ours = tokens(model, prompt.tolist(), 25)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours[0] == theirs[0, 11:].tolist()


@pytest.mark.parametrize("heads", [4, 1])
def test_greedy_batch_with_left_padding_equals_transformers_generate(heads):
    model = random_model(tiny_config(use_parallel_residual=False, num_attention_heads=heads))
    hf = hf_twin(model)
    prompts = [torch.randint(3, 384, (n,)).tolist() for n in (5, 13, 9)]
    ours = tokens(model, prompts, 16)
    for prompt, row in zip(prompts, ours, strict=True):
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert row == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("shape", ["tiny", "kernel-sized"])
def test_compiled_decoding_equals_eager(int8, shape):
    """compile=True compiles the batch-1 step (and, for int8 weights, its fused int8 reduction). A bf16 model with 128
    inputs a layer and heads of 64 goes through neoxko's CPU kernels (bf16 or int8 products, attention), which the
    compiled graph calls as custom ops."""
    from neoxko.generate import compiled_decode_one_token, decode_one_token, prefill
    from neoxko.quantize import quantize_model

    if shape == "tiny":
        model, tolerance = random_model(tiny_config()), 1e-4
    else:
        config = tiny_config(hidden_size=128, num_attention_heads=2, num_hidden_layers=1)
        model, tolerance = random_model(config, dtype=torch.bfloat16), 3e-2  # a bf16 rounding or two apart
    if int8:
        quantize_model(model)
    prompt = torch.tensor([[5, 6, 7, 8]])
    if shape == "tiny":
        assert tokens(model, [[5, 6, 7, 8]], 12) == torch.stack(
            list(generate_tokens(model, [[5, 6, 7, 8]], 12, Sampling(), compile=True)), dim=1).tolist()
    with torch.inference_mode():
        logits = []
        for decode in (decode_one_token, compiled_decode_one_token()):
            model.setup_cache(1, 256)
            prefill(model, prompt, None)
            logits.append(decode(model, torch.tensor([9]), torch.tensor([4]), None).float())
    torch.testing.assert_close(logits[1], logits[0], atol=tolerance, rtol=tolerance)


def test_batch_equals_each_prompt_alone_when_sampling():
    model = random_model(tiny_config())
    prompts = [torch.randint(3, 384, (n,)).tolist() for n in (4, 10)]
    greedy = tokens(model, prompts, 12)
    assert [tokens(model, [p], 12)[0] for p in prompts] == greedy


def test_eos_ends_generation():
    model = random_model(tiny_config())
    prompt = [[5, 6, 7]]
    first = tokens(model, prompt, 10)[0]
    stopped = tokens(model, prompt, 10, eos_id=first[3])
    assert stopped[0] == first[: first.index(first[3]) + 1]


def test_seed_makes_sampling_reproducible():
    model = random_model(tiny_config())
    s = Sampling(temperature=1.0, seed=7)
    a, b = tokens(model, [[1, 2, 3]], 20, s), tokens(model, [[1, 2, 3]], 20, s)
    c = tokens(model, [[1, 2, 3]], 20, Sampling(temperature=1.0, seed=8))
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = random_model(tiny_config())
    greedy = tokens(model, [[9, 8, 7]], 15)
    assert tokens(model, [[9, 8, 7]], 15, Sampling(temperature=1.5, top_k=1, seed=0)) == greedy
    assert tokens(model, [[9, 8, 7]], 15, Sampling(temperature=1.5, top_p=1e-6, seed=0)) == greedy


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    draws = sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    kept = sample(logits, Sampling(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(0))
    assert set(kept.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    kept = sample(logits, Sampling(temperature=1.0, top_k=3), torch.Generator().manual_seed(0))
    assert set(kept.tolist()) == {0, 1, 2}


def test_repetition_penalty_equals_transformers_processor():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(2, 50)
    ids = torch.tensor([[1, 5, 5, 9], [0, 2, 3, 49]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), theirs)


def test_text_generation_and_stop_strings(model_dir):
    from neoxko import load_model

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    full = generate(model, tok, "대한민국은", max_new_tokens=30)
    assert isinstance(full, str) and full
    stop = full[5:8]
    cut = generate(model, tok, "대한민국은", max_new_tokens=30, stop=[stop])
    assert cut == full[: full.find(stop)]
    assert "".join(stream(model, tok, "대한민국은", 30, stop=[stop])) == cut
    assert generate(model, tok, ["대한민국은", "오늘"], max_new_tokens=30)[0] == full


def test_stream_never_splits_a_character(model_dir):
    from neoxko import load_model

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    # A random model emits stray bytes that no text can complete (they decode to U+FFFD anyway);
    # what matters is that the pieces join to exactly the text decoded in one go.
    pieces = list(stream(model, tok, "우리는", 40, Sampling(temperature=1.0, seed=3)))
    assert len(pieces) > 5
    assert "".join(pieces) == generate(model, tok, "우리는", 40, Sampling(temperature=1.0, seed=3))


def test_text_stream_holds_incomplete_hangul(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    byte_ids = [tok.token_to_id(c) for c in "ëĮĢ"]  # the 3 byte-level symbols of '대' (EB 8C 80)
    assert None not in byte_ids
    text_stream = tok.decode_stream()
    assert [text_stream.push(i) for i in byte_ids] == ["", "", "대"]
    pieces = [text_stream.push(i) for i in tok.encode(KOREAN_TEXT)]
    assert "".join(pieces) == KOREAN_TEXT


def test_stop_strings_hold_back_a_possible_start():
    stops = StopStrings(["끝."])
    assert stops.push("이야기의 끝") == "이야기의 "
    assert stops.push("이 아니다") == "끝이 아니다"
    assert stops.push(" 끝.") == " " and stops.stopped


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
])
def test_invalid_sampling_settings(kwargs, message):
    with pytest.raises(GenerationError, match=re.escape(message)):
        Sampling(**kwargs)


def test_prompt_errors():
    model = random_model(tiny_config(max_position_embeddings=32))
    with pytest.raises(GenerationError, match="the prompt is 40 tokens but the model's context window is 32"):
        tokens(model, [[1] * 40], 5)
    with pytest.raises(GenerationError, match="fills the whole 32-token context window"):
        tokens(model, [[1] * 32], 5)
    with pytest.raises(GenerationError, match="at least one token"):
        tokens(model, [[]], 5)
    with pytest.raises(GenerationError, match="max_new_tokens must be >= 1"):
        tokens(model, [[1]], 0)
    with pytest.raises(GenerationError, match=r"token ids must be in \[0, 384\)"):
        tokens(model, [[1, 999]], 5)
    with pytest.warns(UserWarning, match="leaves room for 2 new tokens"):
        assert len(tokens(model, [[1] * 30], 5)[0]) == 2


REFERENCE_TOKENIZER = SHARED / "reference" / "polyglot-ko" / "eleutherai-polyglot-mbbpe-2022-07"


@pytest.mark.skipif(not REFERENCE_TOKENIZER.exists(), reason="../shared/reference not present (fresh clone)")
def test_polyglot_2022_tokenizer_loads_and_streams():
    tok = load_tokenizer(REFERENCE_TOKENIZER)
    ids = tok.encode("대한민국은 민주공화국이다.")
    assert ids == [7635, 296, 1385, 11061, 270, 267, 17]  # the ids its README gives
    assert tok.eos_id == 1 and tok.decode(ids) == "대한민국은 민주공화국이다."
    text_stream = tok.decode_stream()
    ids = tok.encode(KOREAN_TEXT)
    assert "".join(text_stream.push(i) for i in ids) + text_stream.flush() == KOREAN_TEXT


def test_extreme_but_valid_settings_never_sample_from_nan():
    """A tiny temperature is a draw among the best; an extreme penalty stays finite."""
    import torch

    from neoxko.generate import Sampling, apply_repetition_penalty, sample

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, -5.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert sample(logits, Sampling(temperature=1e-38), g).item() == 1
    seen = torch.tensor([[False, False, True, True, False, False]])
    for penalty in (1e-300, 1e300):
        out = apply_repetition_penalty(logits, seen, penalty)
        assert torch.isfinite(out).all()
        pick = sample(out, Sampling(temperature=1.0), torch.Generator().manual_seed(0)).item()
        assert pick in ((2,) if penalty < 1 else (0, 1, 2, 3, 4, 5)) and pick < 6
    with pytest.raises(GenerationError, match="temperature must be a finite number, got inf"):
        Sampling(temperature=float("inf"))
    with pytest.raises(GenerationError, match="repetition_penalty must be a finite number, got nan"):
        Sampling(repetition_penalty=float("nan"))
