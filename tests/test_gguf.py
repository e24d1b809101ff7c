"""`neoxko export --format gguf`, checked by llama.cpp itself (llama-cpp-python): the tokenizer gives the same ids, greedy
decoding the same tokens as neoxko for bf16 and q8_0, q4_0's perplexity stays within 3% of bf16's; every preset's
head layout is written and read back (the gguf package's reader, and llama.cpp's loader); bad input is refused by name.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxko.checkpoint import load_model, save_model
from neoxko.config import PRESETS, ModelConfig
from neoxko.errors import CheckpointError
from neoxko.formats.gguf import write_gguf
from neoxko.generate import Sampling, generate_tokens
from neoxko.model import GPTNeoX
from neoxko.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf", reason="pip install gguf (in neoxko's [test] extra)")

HELDOUT = Path(__file__).parent / "fixtures" / "ko_heldout.jsonl"
KOREAN = ("서울시 강남구 테헤란로 123, 연락처는 <|tel|>이고 계좌는 <|acc|>, 주민번호 <|rrn|>입니다. "
          "Polyglot-Ko 1.3B는 863GB의 한국어 데이터로 학습했습니다!! 😀 (2022년)\n\t  끝.<|endoftext|>")
PROMPTS = ["대한민국의 수도는", "오늘 날씨가 좋아서", "연락처는 <|tel|>입니다. 그리고"]


def _llama():
    return pytest.importorskip("llama_cpp", reason="llama.cpp checks need llama-cpp-python (in neoxko's [test] "
                                                   "extra; it compiles llama.cpp on install)")


_MADE: dict[tuple, Path] = {}  # ko-small's plain exports, made once per session through the CLI (tests only read them)


def _ko_small(tmp_path_factory_or_path, quant: str) -> Path:
    if quant not in _MADE or not _MADE[quant].exists():
        _MADE[quant] = _export(tmp_path_factory_or_path / "made" / quant, quant)
    return _MADE[quant]


def _export(tmp_path: Path, quant: str, *extra: str, model: str = "ko-small") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"ko-small-{quant}.gguf"
    done = subprocess.run([sys.executable, "-m", "neoxko", "export", model, "--format", "gguf", "--quant", quant,
                           "--output", str(out), *extra], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    return out


def _open(llama_cpp, path: Path, **kwargs):
    """llama.cpp's model, without its extra buffer types: on a CPU with AMX, its AMX repack of q8_0 crashes
    (SIGSEGV) on a batch of several tokens, for llama.cpp's own q8_0 files as for ours (llama-cpp-python 0.3.36)."""
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params
    if not getattr(defaults, "plain", False):
        def plain():
            params = defaults()
            params.use_extra_bufts = False
            return params
        plain.plain = True
        low.llama_model_default_params = plain
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0,
                           **kwargs)


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _perplexity(llm, texts: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in texts:
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[:len(ids) - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def ko_small():
    return load_model("ko-small", dtype="float32"), load_tokenizer("ko-small")


def test_llama_cpp_tokenizes_as_neoxko(tmp_path, ko_small):
    llama_cpp = _llama()
    _, tok = ko_small
    llm = llama_cpp.Llama(model_path=str(_ko_small(tmp_path, "q8_0")), vocab_only=True, verbose=False)
    texts = [KOREAN, *PROMPTS] + [json.loads(line)["text"] for line in HELDOUT.open(encoding="utf-8")][:40]
    for text in texts:  # (special: control tokens such as <|endoftext|> are read in the text, as neoxko reads them)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    for token in ("<|tel|>", "<|acc|>", "<|rrn|>"):  # (user-defined tokens: matched in any text, special or not)
        assert llm.tokenize(f"번호 {token}".encode(), add_bos=False, special=False)[-1] == tok.token_to_id(token)
    assert llm.token_eos() == tok.eos_id


@pytest.mark.parametrize("quant", ["bf16", "q8_0"])
def test_llama_cpp_decodes_the_tokens_neoxko_decodes(tmp_path, ko_small, quant):
    llama_cpp = _llama()
    model, tok = ko_small
    llm = _open(llama_cpp, _ko_small(tmp_path, quant))
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = [int(t) for t in generate_tokens(model, [ids], 24, Sampling(temperature=0))]
        assert _greedy(llm, ids, len(ours)) == ours, prompt


def test_q4_0_perplexity_is_within_3_percent_of_bf16(tmp_path, ko_small):
    llama_cpp = _llama()
    _, tok = ko_small
    texts = [tok.encode(json.loads(line)["text"]) for line in HELDOUT.open(encoding="utf-8")]
    texts = [ids for ids in texts if len(ids) >= 8][:60]
    bf16 = _perplexity(_open(llama_cpp, _ko_small(tmp_path, "bf16")), texts)
    q4 = _perplexity(_open(llama_cpp, _ko_small(tmp_path, "q4_0")), texts)
    assert q4 <= bf16 * 1.03, (q4, bf16)


def _tiny(preset: str) -> GPTNeoX:
    """A model with the preset's head size, rotary dims and vocabulary, and few heads and one layer."""
    config = PRESETS[preset]
    small = ModelConfig(**{**config.__dict__, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "hidden_size": 2 * config.head_size, "intermediate_size": 8 * config.head_size})
    torch.manual_seed(0)
    model = GPTNeoX(small)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_is_written_as_llama_cpp_reads_it(tmp_path, preset):
    model = _tiny(preset)
    folder = save_model(model, tmp_path / preset, tokenizer=load_tokenizer("ko-small"))
    path = write_gguf(load_model(folder, dtype="float32"), tmp_path / f"{preset}.gguf", "f16")
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].parts[reader.fields[key].data[0]][0]  # noqa: E731
    config = model.config
    assert field("gptneox.rope.dimension_count") == config.rotary_ndims == 64
    assert field("gptneox.attention.head_count") == 2
    assert field("gptneox.embedding_length") == config.hidden_size
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    d = config.hidden_size
    assert shapes["blk.0.attn_qkv.weight"] == (d, 3 * d) and shapes["output.weight"] == (d, config.vocab_size)
    assert shapes["token_embd.weight"] == (d, config.vocab_size) and shapes["blk.0.ffn_up.weight"] == (d, 4 * d)
    # The fused QKV regrouped: llama.cpp's rows are all queries, then all keys, then all values
    qkv = model.gpt_neox.layers[0].attention.query_key_value.weight.detach()
    written = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    rows = torch.from_numpy(np.array(written.data, dtype=np.float32)).reshape(3 * d, d)
    per_head = qkv.reshape(2, 3, config.head_size, d)
    assert torch.allclose(rows[:d], per_head[:, 0].reshape(d, d).half().float())  # queries of heads 0 and 1
    assert torch.allclose(rows[d:2 * d], per_head[:, 1].reshape(d, d).half().float())
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's loader check needs llama-cpp-python")
    llm = _open(llama_cpp, path)
    assert llm.n_vocab() == config.vocab_size and llm.n_embd() == d


def test_a_quantization_the_rows_cannot_take_is_refused_by_name(tmp_path):
    config = ModelConfig(vocab_size=30080, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=96, max_position_embeddings=64)
    folder = save_model(GPTNeoX(config), tmp_path / "odd", tokenizer=load_tokenizer("ko-small"))
    model = load_model(folder, dtype="float32")
    with pytest.raises(CheckpointError, match=r"gpt_neox\.embed_in\.weight has rows of 48 values, which q8_0's blocks "
                                              r"of 32 do not divide; write this model as bf16, f16$"):
        write_gguf(model, tmp_path / "odd.gguf", "q8_0")
    assert not (tmp_path / "odd.gguf").exists()
    write_gguf(model, tmp_path / "odd.gguf", "f16")  # (what the message offers works)
    with pytest.raises(CheckpointError, match="unknown GGUF quantization 'q3_k'; the ones neoxko writes are bf16, f16, "
                                              "q8_0, q4_0, q4_k_m"):
        write_gguf(model, tmp_path / "odd.gguf", "q3_k")


def test_the_cli_names_what_it_cannot_export(tmp_path):
    done = subprocess.run([sys.executable, "-m", "neoxko", "export", "ko-small", "--output", str(tmp_path / "hf")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "ko-small: no such folder" in done.stderr and "--format gguf writes one for llama.cpp" in done.stderr
    done = subprocess.run([sys.executable, "-m", "neoxko", "export", str(tmp_path / "nowhere"), "--output",
                           str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "nowhere" in done.stderr


def test_a_peft_adapter_is_merged_into_the_file(tmp_path, ko_small):
    llama_cpp = _llama()
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from neoxko.checkpoint import resolve

    base = resolve("ko-small")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value", "dense_h_to_4h"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "adapter")
    merged = load_model(base, dtype="float32", adapter=tmp_path / "adapter")
    _, tok = ko_small
    llm = _open(llama_cpp, _export(tmp_path, "bf16", "--adapter", str(tmp_path / "adapter")))
    base_llm = _open(llama_cpp, _ko_small(tmp_path, "bf16"))
    ids = tok.encode(PROMPTS[0])
    ours = [int(t) for t in generate_tokens(merged, [ids], 16, Sampling(temperature=0))]
    assert _greedy(llm, ids, 16) == ours
    assert _greedy(base_llm, ids, 16) != ours  # (the adapter changed what the model says)


def test_an_int8_checkpoint_exports_as_q8_0(tmp_path):
    llama_cpp = _llama()
    tok = load_tokenizer("ko-small")
    done = subprocess.run([sys.executable, "-m", "neoxko", "quantize", "--model", "ko-small", "--bits", "8",
                           "--output", str(tmp_path / "int8")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    texts = [tok.encode(json.loads(line)["text"]) for line in HELDOUT.open(encoding="utf-8")]
    texts = [ids for ids in texts if len(ids) >= 8][:40]
    from_int8 = _perplexity(_open(llama_cpp, _export(tmp_path, "q8_0", model=str(tmp_path / "int8"))), texts)
    bf16 = _perplexity(_open(llama_cpp, _ko_small(tmp_path, "bf16")), texts)
    assert from_int8 <= bf16 * 1.01, (from_int8, bf16)


def test_a_gguf_file_reads_back_into_a_folder_transformers_loads(tmp_path, ko_small):
    transformers = pytest.importorskip("transformers")
    model, tok = ko_small
    done = subprocess.run([sys.executable, "-m", "neoxko", "export", str(_ko_small(tmp_path, "bf16")), "--format", "hf",
                           "--output", str(tmp_path / "back")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    back = load_model(tmp_path / "back", dtype="float32")
    assert load_tokenizer(tmp_path / "back").encode(KOREAN) == tok.encode(KOREAN)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["dtype"] == "bfloat16"  # (the head written out is tied again)
    tokenizer_config = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 512 and "<|tel|>" in tokenizer_config["additional_special_tokens"]
    x = torch.tensor([tok.encode(KOREAN)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))  # (ko-small's weights are bf16: written and read back exactly)
        assert (hf(x).logits - model(x)).abs().max() < 1e-4
    with pytest.raises(CheckpointError, match="is a GGUF file; `neoxko export .* --format hf --output FOLDER`"):
        load_model(_ko_small(tmp_path, "q8_0"))
    (tmp_path / "not.gguf").write_text("text")  # (by its first bytes, not its name)
    with pytest.raises(CheckpointError, match="not.gguf is a file; pass the folder that holds config.json"):
        load_model(tmp_path / "not.gguf")


def test_llama_cpps_own_k_quants_read_back_with_llama_cpps_perplexity(tmp_path, ko_small):
    llama_cpp = _llama()
    from neoxko.formats.gguf import read_gguf

    _, tok = ko_small
    path = _export(tmp_path, "q4_k_m")  # (made by llama.cpp's quantizer)
    model = load_model(read_gguf(path, tmp_path / "back"), dtype="float32")
    texts = [tok.encode(json.loads(line)["text"])[:256] for line in HELDOUT.open(encoding="utf-8")]
    texts = [ids for ids in texts if len(ids) >= 8][:30]
    with torch.no_grad():
        ours = math.exp(sum(torch.nn.functional.cross_entropy(model(torch.tensor([ids]))[0, :-1], torch.tensor(ids[1:]),
                                                              reduction="sum").item() for ids in texts)
                        / sum(len(ids) - 1 for ids in texts))
    theirs = _perplexity(_open(llama_cpp, path), texts)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)


def test_quant_names_are_read_in_any_case(tmp_path):
    out = _export(tmp_path, "Q8_0")
    assert gguf.GGUFReader(str(out)).tensors[0].tensor_type.name == "Q8_0"


def test_gguf_files_neoxko_cannot_read_are_named(tmp_path):
    from neoxko.formats.gguf import read_gguf

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    done = subprocess.run([sys.executable, "-m", "neoxko", "export", str(fake), "--format", "hf", "--output",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "fake.gguf is not a GGUF file (it does not start with GGUF's magic bytes)" in done.stderr
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"llama.gguf holds a 'llama' model; neoxko reads GPT-NeoX \('gptneox'\) "
                                              r"GGUF files"):
        read_gguf(tmp_path / "llama.gguf", tmp_path / "out")


def test_the_chat_template_rides_in_the_file_and_back(tmp_path):
    from neoxko.chat_template import tokenizer_template
    from neoxko.checkpoint import resolve
    from neoxko.formats.gguf import read_gguf

    path = _export(tmp_path, "q8_0", model="ko-small-chat")  # (an adapter folder with its own chat template)
    template = tokenizer_template(resolve("ko-small-chat"))
    assert template and gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents() == template
    assert tokenizer_template(read_gguf(path, tmp_path / "back")) == template
