"""Parity with transformers' GPTNeoXForCausalLM, cached decoding, left padding, dtypes."""

import pytest
import torch
from torch.testing import assert_close

from conftest import hf_twin, random_model, tiny_config
from neoxko.config import PRESETS
from neoxko.model import GPTNeoX, Step

pytest.importorskip("transformers")


@pytest.mark.parametrize("rotary_pct", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_transformers(rotary_pct, parallel, tied):
    config = tiny_config(rotary_pct=rotary_pct, use_parallel_residual=parallel, tie_word_embeddings=tied)
    model = random_model(config)
    hf = hf_twin(model)
    idx = torch.randint(0, config.vocab_size, (3, 37))
    with torch.no_grad():
        assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_no_attention_bias_and_tanh_gelu_equal_transformers():
    config = tiny_config(attention_bias=False, hidden_act="gelu_new", rotary_emb_base=500.0)
    model = random_model(config)
    idx = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        assert_close(model(idx), hf_twin(model)(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_float32_and_transformers(dtype):
    model = random_model(tiny_config())
    idx = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        full = model(idx)
        half = model.to(dtype)(idx)
        assert half.dtype == dtype
        assert_close(half.float(), full, atol=0.15, rtol=0.05)
        assert_close(half.float(), hf_twin(model)(idx).logits.float(), atol=0.15, rtol=0.05)


def test_polyglot_ko_1_3b_shapes_equal_transformers():
    """At the real 1.3B widths, heads, rotary dims and padded vocabulary (2 of its 24 identical layers: the whole
    depth adds 45 s of random numbers and nothing a layer does not show): our weights shared into transformers'."""
    import dataclasses

    import transformers
    from transformers.initialization import no_init_weights

    config = dataclasses.replace(PRESETS["polyglot-ko-1.3b"], num_hidden_layers=2)
    hf_config = transformers.GPTNeoXConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(-0.1, 0.1)  # (non-trivial norms and biases too)
    model.setup_rope("cpu")
    with no_init_weights():
        hf = transformers.GPTNeoXForCausalLM(hf_config)
    hf.load_state_dict({("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in model.state_dict().items()},
                       strict=True, assign=True)
    idx = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        assert_close(model.eval()(idx), hf.eval()(idx).logits, atol=1e-4, rtol=0)


def test_cached_decoding_equals_full_forward():
    model = random_model(tiny_config())
    idx = torch.randint(0, 384, (2, 30))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(batch_size=2, max_seq_len=40)
        steps = [model(idx[:, :10], Step(input_pos=torch.arange(10)))]  # a prefill, then one token at a time
        steps += [model(idx[:, t:t + 1], Step(input_pos=torch.tensor([t]))) for t in range(10, 30)]
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_full_forward():
    model = random_model(tiny_config())
    idx = torch.randint(0, 384, (1, 30))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(batch_size=1, max_seq_len=30)
        chunks = [model(idx[:, a:b], Step(input_pos=torch.arange(a, b))) for a, b in ((0, 12), (12, 25), (25, 30))]
    assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_each_prompt_alone():
    model = random_model(tiny_config())
    lengths = [9, 4, 7]
    prompts = [torch.randint(1, 384, (n,)) for n in lengths]
    T = max(lengths)
    idx = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    left_pad = torch.tensor([T - n for n in lengths])
    with torch.no_grad():
        batched = model(idx, Step(left_pad=left_pad))
        for row, p in enumerate(prompts):
            alone = model(p[None])
            assert_close(batched[row, left_pad[row]:], alone[0], atol=1e-5, rtol=0)
        # and with the cache, one more token per row
        model.setup_cache(batch_size=3, max_seq_len=T + 1)
        model(idx, Step(input_pos=torch.arange(T), left_pad=left_pad))
        nxt = torch.randint(1, 384, (3, 1))
        step = model(nxt, Step(input_pos=torch.tensor([T]), left_pad=left_pad))
        for row, p in enumerate(prompts):
            assert_close(step[row, 0], model(torch.cat([p, nxt[row]])[None])[0, -1], atol=1e-5, rtol=0)


def test_rows_at_their_own_positions_equal_each_sequence_alone():
    """Continuous batching's addressing: prefill into chosen cache rows, then decode rows at different lengths."""
    model = random_model(tiny_config())
    seqs = [torch.randint(1, 384, (n,)) for n in (9, 4, 6)]
    with torch.no_grad():
        model.setup_cache(batch_size=4, max_seq_len=16)
        for row, s in zip((2, 0, 1), seqs, strict=True):  # prompts minus their last token, each into its row
            model(s[None, :-1], Step(input_pos=torch.arange(len(s) - 1)[None], rows=torch.tensor([row]),
                                     kv_len=len(s) - 1))
        last = torch.stack([seqs[1][-1:], seqs[2][-1:], seqs[0][-1:]])  # rows 0, 1, 2: (3, 1)
        positions = torch.tensor([[3], [5], [8]])
        dense = model(last, Step(input_pos=positions, kv_len=9))  # rows None: the batch is cache rows 0..2, no gather
        gathered = model(last[[2, 0]], Step(input_pos=positions[[2, 0]], rows=torch.tensor([2, 0]), kv_len=9))
    for out, s in ((dense[0], seqs[1]), (dense[1], seqs[2]), (dense[2], seqs[0]), (gathered[0], seqs[0]),
                   (gathered[1], seqs[1])):
        assert_close(out[-1], model(s[None])[0, -1], atol=1e-5, rtol=0)


def test_cached_forward_without_setup_says_what_to_do():
    model = random_model(tiny_config())
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), Step(input_pos=torch.tensor([0])))


def test_state_dict_names_are_transformers_names():
    model = random_model(tiny_config())
    hf = hf_twin(model)
    ours = set(model.state_dict())
    theirs = {("embed_out.weight" if k == "lm_head.weight" else k) for k in hf.state_dict()}
    assert ours == theirs
