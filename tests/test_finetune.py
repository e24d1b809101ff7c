"""Fine-tuning: answer-only loss, packing, LoRA against peft (both directions), merging, chat templates against
transformers, learning, resume, FSDP under torchrun, and the data errors."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import model_folder, random_model, tiny_config
from neoxko.checkpoint import load_model, save_model
from neoxko.finetune.config import FinetuneConfig
from neoxko.finetune.data import DataError, Example, InstructionBatches, encode, fit, read_examples
from neoxko.finetune.job import Finetuning
from neoxko.finetune.lora import LoraSettings, apply_lora, init_lora, load_adapter, merge_lora
from neoxko.tokenizer import load_tokenizer
from neoxko.train.data import IGNORE
from neoxko.train.loop import train

QA = [("한국의 수도는?", "서울입니다."), ("오늘 날씨 어때?", "맑게 개었다."), ("커피 마실래?", "카페에 가자."),
      ("기차로 얼마나 걸려?", "두 시간 반이 걸린다."), ("연락처 알려줘", "010-2345-6789 입니다.")]
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny model folder with a context long enough for packed rows, and the fixture tokenizer."""
    return model_folder(tmp_path_factory.mktemp("base"), tokenizer_dir, tiny_config(max_position_embeddings=256), 5)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(pairs=QA) -> list:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def settings(base: Path, data: Path, out: Path, **changes) -> dict:
    cfg = dict(model=str(base), data=[str(data)], eval_split=0.0, seq_len=128, micro_batch=2, global_batch=4,
               max_steps=40, lr=1e-2, min_lr=1e-2, warmup_steps=2, out_dir=str(out), log_every=1, save_every=1000,
               eval_every=0, lora_targets=TARGETS, lora_dropout=0.0)
    return cfg | changes


def template(name="chat") -> str:
    from neoxko.chat_template import load_template

    return load_template(name)[0]


def test_only_answer_tokens_are_targets_and_prompt_positions_get_no_gradient(base_dir):
    tok = load_tokenizer(base_dir)
    example = Example(({"role": "system", "content": "친절하게"}, {"role": "user", "content": "한국의 수도는?"},
                       {"role": "assistant", "content": "서울입니다."}, {"role": "user", "content": "부산은?"},
                       {"role": "assistant", "content": "항구 도시."}), "x:1")
    enc = encode(example, template(), tok)
    answers = tok.decode([t for t in enc.labels if t != IGNORE])
    assert answers == " 서울입니다.<|endoftext|> 항구 도시.<|endoftext|>"
    model = random_model(tiny_config(max_position_embeddings=256))
    rows = InstructionBatches([enc], 128, tok.eos_id, packing=False, seed=0)
    batch = rows.batch(0, 1)
    logits = model(batch.inputs, batch.step())
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum").backward()
    per_position = logits.grad[0].abs().sum(-1)
    masked = batch.targets[0] == IGNORE
    assert per_position[masked].max() == 0 and (per_position[~masked] > 0).all()


def test_packed_rows_give_the_loss_of_the_examples_one_by_one(base_dir):
    tok = load_tokenizer(base_dir)
    encoded = [encode(Example(tuple(r["messages"]), f"x:{i}"), template(), tok) for i, r in enumerate(chat_rows())]
    model = random_model(tiny_config(max_position_embeddings=256))
    packed = InstructionBatches(encoded, 256, tok.eos_id, packing=True, seed=0, shuffle=False)
    assert len(packed) < len(encoded) and max(len(row) for row in packed.rows) > 1  # examples share rows

    def summed(batches, n):
        total = 0.0
        for i in range(n):
            b = batches.batch(i, 1)
            total += F.cross_entropy(model(b.inputs, b.step()).flatten(0, 1), b.targets.flatten(),
                                     ignore_index=IGNORE, reduction="sum").item()
        return total

    alone = InstructionBatches(encoded, 128, tok.eos_id, packing=False, seed=0, shuffle=False)
    assert summed(packed, len(packed)) == pytest.approx(summed(alone, len(encoded)), rel=1e-5)
    assert packed.target_count(0, len(packed)) == alone.target_count(0, len(encoded))


def test_lora_at_step_zero_is_the_base_model_and_merging_changes_nothing(base_dir):
    base = load_model(base_dir, dtype="float32")
    adapted = load_model(base_dir, dtype="float32")
    apply_lora(adapted, LoraSettings(r=4, alpha=8, dropout=0.0, targets=tuple(TARGETS)))
    init_lora(adapted, seed=0)
    x = torch.randint(0, 380, (2, 16))
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x))
        for name, p in adapted.named_parameters():  # a trained adapter: nonzero B
            if "lora_B" in name:
                p.normal_(0, 0.05)
        unmerged = adapted(x)
        assert (unmerged - base(x)).abs().max() > 1e-3
        merged = merge_lora(adapted)(x)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not any("lora" in n for n, _ in adapted.named_parameters())


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory) -> Path:
    """A LoRA run that learns the four answers."""
    out = tmp_path_factory.mktemp("lora")
    data = write_jsonl(out / "qa.jsonl", chat_rows())
    cfg = FinetuneConfig(**settings(base_dir, data, out / "run", max_steps=60))
    train(cfg, Finetuning(cfg))
    return out / "run"


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").open()]


def test_a_tiny_model_learns_the_answers_and_chat_answers_them(trained, base_dir):
    from neoxko.chat_template import render, tokenizer_template
    from neoxko.generate import Sampling, generate

    history = losses(trained)
    # a frozen random head bounds how sure the answers can get under LoRA (full fine-tuning goes to zero, below)
    assert history[0] > 5 and history[-1] < 1.0
    adapter = trained / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    source = tokenizer_template(adapter)
    assert source == template("chat")  # the template rides in tokenizer_config.json
    model = load_model(adapter)  # an adapter folder loads its base (base_model_name_or_path) with it
    tok = load_tokenizer(adapter)
    for q, a in QA:
        prompt = render(source, [{"role": "user", "content": q}], True, eos_token=tok.eos_token)
        assert generate(model, tok, prompt, 24, Sampling(temperature=0)).strip() == a
    # neoxko chat: piped turns, streaming, the conversation kept between them
    out = subprocess.run([sys.executable, "-m", "neoxko", "chat", "--model", str(adapter), "--temperature", "0",
                          "--max-new-tokens", "24"], input=f"{QA[0][0]}\n{QA[3][0]}\n", capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [QA[0][1], QA[3][1]]
    out = subprocess.run([sys.executable, "-m", "neoxko", "chat", "--model", str(adapter), "--temperature", "0",
                          "--max-new-tokens", "24", "--mask-pii"], input=f"{QA[4][0]}\n", capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.splitlines() == ["<|tel|> 입니다."] and "masked" not in out.stdout


def test_peft_loads_our_adapter_and_we_load_peft_adapters(trained, base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    x = torch.randint(0, 380, (2, 24))
    ours_unmerged = load_adapter(load_model(base_dir, dtype="float32"), trained / "adapter", merge=False)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, trained / "adapter").eval()(x).logits
        assert (theirs - ours_unmerged(x)).abs().max() < 1e-4
        assert (theirs - load_model(trained / "adapter", dtype="float32")(x)).abs().max() < 1e-4  # merged

    # the other way: an adapter peft initialised and wrote, with rsLoRA and a regex target
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=r".*\.(query_key_value|dense_4h_to_h)",
                             init_lora_weights=False, task_type="CAUSAL_LM")
    written = peft.get_peft_model(hf, config)
    written.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = written.eval()(x).logits
        ours = load_model(base_dir, dtype="float32", adapter=tmp_path / "peft")(x)
    assert (expected - ours).abs().max() < 1e-4


def test_merge_lora_writes_a_plain_folder_transformers_loads(trained, base_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-m", "neoxko", "merge-lora", str(base_dir), str(trained / "adapter"),
                          "--output", str(tmp_path / "merged")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    x = torch.randint(0, 380, (1, 20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - load_model(trained / "adapter", dtype="float32")(x)).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    messages = [{"role": "system", "content": "짧게"}, {"role": "user", "content": "안녕?"},
                {"role": "assistant", "content": "안녕하세요."}, {"role": "user", "content": "뭐 해?"}]
    from neoxko.chat_template import render

    for name in ("chat", "koalpaca"):  # transformers' apply_chat_template and ours: the same prompt
        text = tok.apply_chat_template(messages, chat_template=template(name), tokenize=False,
                                       add_generation_prompt=True)
        assert text == render(template(name), messages, True, bos_token="", eos_token=tok.eos_token)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        render(template("chat"), messages, True, eos_token=tok.eos_token)  # the folder's own template


def test_full_fine_tuning_on_alpaca_data_writes_a_model_with_its_template(base_dir, tmp_path):
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = FinetuneConfig(**settings(base_dir, data, tmp_path / "run", method="full", lr=3e-3, min_lr=3e-3,
                                    max_steps=40, packing=False))
    train(cfg, Finetuning(cfg))
    assert losses(tmp_path / "run")[-1] < 0.05
    from neoxko.chat_template import tokenizer_template

    assert tokenizer_template(tmp_path / "run" / "model") == template("koalpaca")  # alpaca data: koalpaca
    assert json.loads((tmp_path / "run" / "data.json").read_text())["format"] == "alpaca"


def test_lora_on_an_int8_base_learns(base_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", chat_rows())
    cfg = FinetuneConfig(**settings(base_dir, data, tmp_path / "run", quantize_base="int8", max_steps=30))
    train(cfg, Finetuning(cfg))
    history = losses(tmp_path / "run")
    assert history[-1] < history[0] / 4


def test_resume_after_sigterm_equals_an_uninterrupted_run(base_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", chat_rows() * 4)
    full = settings(base_dir, data, tmp_path / "full", max_steps=60, lora_dropout=0.1)
    train(FinetuneConfig(**full), Finetuning(FinetuneConfig(**full)))
    cut = full | {"out_dir": str(tmp_path / "cut")}
    proc = subprocess.Popen([sys.executable, "-m", "neoxko", "finetune", *[f"{k}={json.dumps(v)}" for k, v in
                                                                          cut.items()]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 5) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert len(log.read_text().splitlines()) < 60, "the run ended before the signal"
    ckpt = next((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 2e6  # LoRA checkpoints: adapters and their state only
    train(FinetuneConfig(**cut), Finetuning(FinetuneConfig(**cut)))
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_lora_on_two_ranks_equals_one(base_dir, tmp_path, parallel):
    from test_train_distributed import free_port

    data = write_jsonl(tmp_path / "qa.jsonl", chat_rows() * 2)
    one = settings(base_dir, data, tmp_path / "one", max_steps=4, global_batch=8)
    train(FinetuneConfig(**one), Finetuning(FinetuneConfig(**one)))
    # activation checkpointing changes no number, and its wrapper no name in the adapter
    two = one | {"out_dir": str(tmp_path / "two"), "parallel": parallel, "activation_checkpointing": True}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "neoxko", "finetune", *[f"{k}={json.dumps(v)}" for k, v in two.items()]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"instruction": "질문", "output": "답"}\n{"instruction": "질문"}\n', "bad.jsonl:2", "output"),
        ('{"messages": [{"role": "user", "content": "안녕"}]}\n', "bad.jsonl:1", "no assistant message"),
        ('{"messages": [{"role": "bot", "content": "안녕"}]}\n', "bad.jsonl:1", "role: system|user|assistant"),
        ('{"prompt": "a", "response": "b"}\n\n{oops\n', "bad.jsonl:3", "not valid JSON"),
        ('{"text": "a"}\n', "bad.jsonl:1", "cannot tell the format"),
    ]
    for text, where, what in cases:
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=where) as e:
            read_examples([bad])
        assert what in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        read_examples([tmp_path / "missing.jsonl"])
    (tmp_path / "list.json").write_text('{"instruction": "a"}')
    with pytest.raises(DataError, match="must hold a list"):
        read_examples([tmp_path / "list.json"])


def test_overlong_examples_are_dropped_truncated_or_refused(base_dir, tmp_path):
    tok = load_tokenizer(base_dir)
    long = Example(({"role": "user", "content": "짧게"}, {"role": "assistant", "content": "서울 " * 200}), "d.jsonl:7")
    short = Example(({"role": "user", "content": "짧게"}, {"role": "assistant", "content": "네."}), "d.jsonl:8")
    encoded = [encode(e, template(), tok) for e in (long, short)]
    kept, report = fit(encoded, 64, "drop")
    assert len(kept) == 1 and report["overlong"] == 1 and report["first_overlong"] == "d.jsonl:7"
    kept, _ = fit(encoded, 64, "truncate")
    assert [len(e.ids) for e in kept] == [64, len(encoded[1].ids)]
    with pytest.raises(DataError, match="d.jsonl:7: the example is .* tokens, more than seq_len 64"):
        fit(encoded, 64, "error")


def test_bad_settings_and_adapters_are_refused(base_dir, tmp_path):
    from neoxko.errors import CheckpointError, ConfigError

    for bad, message in [({"method": "qlora"}, "method must be lora or full"),
                         ({"lora_targets": ["attention"]}, "not GPT-NeoX linear layers"),
                         ({"quantize_base": "int8", "method": "full"}, "needs method: lora"),
                         ({"quantize_base": "int8", "parallel": "fsdp"}, "one process or under DDP"),
                         ({"overlong": "cut"}, "overlong must be"), ({"lora_r": 0}, "lora_r must be at least 1")]:
        with pytest.raises(ConfigError, match=message):
            FinetuneConfig(**({"data": ["x.jsonl"]} | bad))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_bias": True,
                                                             "target_modules": ["query_key_value"],
                                                             "base_model_name_or_path": str(base_dir)}))
    with pytest.raises(CheckpointError, match="lora_bias=True, which neoxko does not apply"):
        load_model(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                             "target_modules": ["query_key_value"]}))
    with pytest.raises(CheckpointError, match="names no base model"):
        load_model(adapter)
    other = tmp_path / "other"
    save_model(random_model(tiny_config(hidden_size=32)), other)
    settings_ = LoraSettings(r=2, targets=("query_key_value",))
    from neoxko.finetune.lora import save_adapter

    small = random_model(tiny_config(hidden_size=32))
    apply_lora(small, settings_)
    save_adapter({n: p for n, p in small.named_parameters() if "lora_" in n}, settings_, tmp_path / "a32", None)
    with pytest.raises(CheckpointError, match="shape .* was it trained on another base model"):
        load_model(base_dir, adapter=tmp_path / "a32")


def test_the_adapter_folder_serves_chat_with_its_own_template(trained):
    """neoxko serve --model OUT/adapter: the openai client's chat call gets the trained answer."""
    openai = pytest.importorskip("openai")
    from neoxko.serve.engine import Engine
    from neoxko.serve.server import ServeSettings, serve

    adapter = trained / "adapter"
    tokenizer = load_tokenizer(adapter)
    server = serve(Engine(load_model(adapter), tokenizer.eos_id, max_batch=2), tokenizer,
                   ServeSettings(model_name="tuned"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none")
        reply = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": QA[2][0]}],
                                               temperature=0, max_tokens=24)
    finally:
        server.close()
    assert reply.choices[0].message.content.strip() == QA[2][1]
    assert reply.choices[0].finish_reason == "stop"  # the end-of-text token the template taught


def test_a_run_resumed_with_another_lora_shape_or_method_is_refused(base_dir, tmp_path):
    from neoxko.errors import CheckpointError

    data = write_jsonl(tmp_path / "qa.jsonl", chat_rows())
    first = settings(base_dir, data, tmp_path / "run", max_steps=2, lora_r=4)
    train(FinetuneConfig(**first), Finetuning(FinetuneConfig(**first)))
    for change, said in [({"lora_r": 8}, "lora_r 4.*this run trains method lora, lora_r 8"),
                         ({"method": "full"}, "lora_r 4.*this run trains method full")]:
        again = FinetuneConfig(**first | {"max_steps": 4} | change)
        with pytest.raises(CheckpointError, match=f"saved by a run that trains method lora, {said}.*new out_dir"):
            train(again, Finetuning(again))


def test_a_model_saved_from_an_adapter_keeps_its_tokenizer_and_template(trained, tmp_path):
    """neoxko quantize --model ADAPTER (and save_model) write the adapter's tokenizer, with its chat template."""
    from neoxko.chat_template import tokenizer_template

    out = subprocess.run([sys.executable, "-m", "neoxko", "quantize", "--model", str(trained / "adapter"),
                          "--output", str(tmp_path / "q")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert tokenizer_template(tmp_path / "q") == template("chat")
