"""KoBEST: exact lm-evaluation-harness prompts and few-shot draws, scoring against a plain reference, outputs."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_twin, random_model, tiny_config
from neoxko.errors import NeoxkoError
from neoxko.evaluate.kobest import EvalSettings, evaluate, task_metrics, write_outputs
from neoxko.evaluate.metrics import accuracy, macro_f1
from neoxko.evaluate.scoring import HFScorer, Item, NeoxkoScorer, encode_item, encode_pair
from neoxko.evaluate.tasks import TASKS, build_requests, load_split, make_doc, resolve_tasks
from neoxko.tokenizer import load_tokenizer

DATA = Path(__file__).parent / "fixtures" / "kobest"


def test_zero_shot_prompts_are_the_harness_strings():
    first = {t: build_requests(t, 0, DATA)[0] for t in TASKS}
    assert first["kobest_boolq"].context == "부산은 대한민국 제2의 도시로 큰 항구가 있다. 질문: 부산에는 항구가 있나? 답변: "
    assert first["kobest_copa"].context == "비가 많이 왔다.  그래서"  # two spaces in lm-eval 0.4.x
    assert first["kobest_wic"].context == "문장1: [손]을 깨끗이 씻었다. 문장2: [손]이 차가워 장갑을 꼈다. 두 문장에서 손가 같은 뜻으로 쓰였나?"
    assert first["kobest_hellaswag"].context == "문장: 남자가 자동차에 탄다."
    assert first["kobest_sentineg"].context == "문장: 생각보다 훨씬 좋네요 긍부정:"
    assert first["kobest_boolq"].doc.choices == ("아니오", "예") and first["kobest_sentineg"].doc.choices == ("부정", "긍정")
    assert first["kobest_copa"].doc.choices == ("우산을 썼다.", "선글라스를 썼다.")
    copa = build_requests("kobest_copa", 0, DATA, style="polyglot")
    assert {r.context for r in copa} >= {"비가 많이 왔다. 그래서", "친구가 화를 냈다. 왜냐하면"}


def test_few_shot_context_and_draw():
    requests = build_requests("kobest_copa", 2, DATA)
    train = [json.loads(line) for line in (DATA / "copa" / "train.jsonl").open(encoding="utf-8")]
    rng = random.Random(1234)
    for request in requests:  # one sample(train, k) per test document, in order
        examples = rng.sample(train, 2)
        shots = "".join(f"{ex['premise']}  {'왜냐하면' if ex['question'] == '원인' else '그래서'} "
                        f"{ex['alternative_1'] if ex['label'] == 0 else ex['alternative_2']}\n\n" for ex in examples)
        assert request.context == shots + request.doc.text
    sentineg = build_requests("kobest_sentineg", 1, DATA)[0].context
    assert sentineg.count("\n\n") == 1 and sentineg.endswith("문장: 생각보다 훨씬 좋네요 긍부정:")
    assert " 긍정\n\n" in sentineg or " 부정\n\n" in sentineg


def test_polyglot_style_shuffles_documents_with_seed_42_and_draws_from_it():
    requests = build_requests("kobest_boolq", 1, DATA, style="polyglot")
    rng = random.Random(42)
    order = list(range(4))
    rng.shuffle(order)
    assert [r.doc_id for r in requests] == order
    train = [make_doc("kobest_boolq", row) for row in load_split("kobest_boolq", "train", DATA)]
    assert requests[0].context.startswith(rng.sample(train, 1)[0].text)


def test_limit_takes_the_first_documents():
    assert [r.doc_id for r in build_requests("kobest_wic", 3, DATA, limit=2)] == [0, 1]


def test_encode_pair_moves_trailing_spaces_like_the_harness(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ctx, cont = encode_pair(tok.encode, "대한민국은 답변: ", " 예")
    assert ctx == tok.encode("대한민국은 답변:")
    assert tok.encode("대한민국은 답변:") + cont == tok.encode("대한민국은 답변:  예")


def reference_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """Written independently of the scorer: one full forward of context + continuation per choice."""
    idx = torch.tensor([(context + continuation)[-(model.config.max_position_embeddings + 1):][:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(idx)[0].float(), dim=-1)
    n = len(continuation)
    return sum(logprobs[-n + i, t].item() for i, t in enumerate(continuation))


def test_tree_scoring_equals_plain_forwards(tokenizer_dir):
    model = random_model(tiny_config(max_position_embeddings=64))
    tok = load_tokenizer(tokenizer_dir)
    scorer = NeoxkoScorer(model, tok, batch_tokens=200)
    requests = [r for t in TASKS for r in build_requests(t, 1, DATA)]
    items = [encode_item(scorer.encode, r.context, [" " + c for c in r.doc.choices]) for r in requests]
    assert any(len(i.context) + max(map(len, i.branches)) > 65 for i in items)  # some need left truncation
    ours = scorer.loglikelihoods(items)
    for item, lls in zip(items, ours, strict=True):
        expected = [reference_loglikelihood(model, item.context, b) for b in item.branches]
        assert lls == pytest.approx(expected, abs=1e-4)


def test_hf_backend_equals_neoxko_backend(tokenizer_dir):
    model = random_model(tiny_config())
    tok = load_tokenizer(tokenizer_dir)
    items = [Item([5, 6, 7, 8], [[9, 10], [11], [12, 13, 14]]), Item([20] * 30, [[1], [2, 3]])]
    ours = NeoxkoScorer(model, tok).loglikelihoods(items)
    hf = HFScorer(hf_twin(model), None).loglikelihoods(items)
    for a, b in zip(ours, hf, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_metrics_and_acc_norm():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(50):
        golds, preds = [rng.randrange(3) for _ in range(20)], [rng.randrange(3) for _ in range(20)]
        assert macro_f1(preds, golds) == pytest.approx(sklearn.f1_score(golds, preds, average="macro"), abs=1e-12)
    acc, stderr = accuracy([1, 0, 1, 1], [1, 1, 1, 1])
    assert acc == 0.75 and stderr == pytest.approx((0.25 / 4) ** 0.5)
    requests = build_requests("kobest_hellaswag", 0, DATA)
    lls = [[-len(c) * 1.0 - (0.5 if i == r.doc.label else 0) for i, c in enumerate(r.doc.choices)] for r in requests]
    metrics = task_metrics("kobest_hellaswag", requests, lls)
    assert "acc_norm" in metrics and metrics["n"] == 3 and sum(metrics["pred_counts"]) == 3


def test_one_class_answers_are_flagged(tokenizer_dir):
    requests = build_requests("kobest_boolq", 0, DATA)
    metrics = task_metrics("kobest_boolq", requests, [[0.0, -1.0]] * len(requests))
    assert metrics["pred_counts"] == [4, 0] and "majority-class floor" in metrics["warning"]


def test_outputs(tmp_path, tokenizer_dir):
    model = random_model(tiny_config())
    settings = EvalSettings(tasks=list(TASKS), shots=[0, 1], data_dir=str(DATA))
    results, samples = evaluate(NeoxkoScorer(model, load_tokenizer(tokenizer_dir)), settings, progress=False)
    write_outputs(tmp_path, "tiny", settings, results, samples)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "tiny" and saved["settings"]["shots"] == [0, 1]
    boolq = saved["results"]["kobest_boolq"]["1"]
    assert set(boolq) >= {"acc", "acc_stderr", "macro_f1", "macro_f1_stderr", "n", "pred_counts"}
    assert "acc_norm" in saved["results"]["kobest_hellaswag"]["0"]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2 * (4 + 4 + 4 + 3 + 4)
    table = (tmp_path / "results.md").read_text()
    assert "the number of few shot examples = 1" in table and "GPT-NeoX-Ko 1.3B (model card) | 0.6590" in table
    assert (tmp_path / "scores.png").stat().st_size > 1000  # matplotlib is a test dependency


def test_bad_input(tmp_path):
    with pytest.raises(NeoxkoError, match="unknown task 'kobest_nope'"):
        resolve_tasks(["kobest_nope"])
    assert resolve_tasks(["kobest", "kobest_copa"]) == list(TASKS)
    shutil.copytree(DATA, tmp_path / "data")
    (tmp_path / "data" / "wic" / "test.jsonl").unlink()
    with pytest.raises(NeoxkoError, match=r"wic/test.jsonl is missing"):
        build_requests("kobest_wic", 0, tmp_path / "data")
    with (tmp_path / "data" / "copa" / "test.jsonl").open("a") as f:
        f.write('{"premise": "x", "question": "이유", "alternative_1": "a", "alternative_2": "b", "label": 0}\n')
    with pytest.raises(NeoxkoError, match=r"copa/test.jsonl:5: malformed copa row"):
        build_requests("kobest_copa", 0, tmp_path / "data")
    with pytest.raises(NeoxkoError, match="10 shots asked for, but train has only 6 examples"):
        build_requests("kobest_boolq", 10, DATA)


def test_cli_eval_and_missing_tokenizer(tmp_path, model_dir):
    out = subprocess.run([sys.executable, "-m", "neoxko", "eval", "--model", str(model_dir), "--tasks",
                          "kobest_copa,kobest_sentineg", "--shots", "0,2", "--data-dir", str(DATA), "--output",
                          str(tmp_path / "ev")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert set(json.loads((tmp_path / "ev" / "results.json").read_text())["results"]) == {"kobest_copa",
                                                                                         "kobest_sentineg"}
    shutil.copytree(model_dir, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    out = subprocess.run([sys.executable, "-m", "neoxko", "eval", "--model", str(tmp_path / "m"), "--data-dir",
                          str(DATA)], capture_output=True, text=True)
    assert out.returncode == 2 and "has no tokenizer.json" in out.stderr


def test_hub_dataset_offline_says_what_to_do(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    import datasets
    import huggingface_hub

    # both read the variables when first imported (conftest's imports came first): set what they read
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(NeoxkoError, match="could not load skt/kobest_v1/copa .*pass --data-dir"):
        load_split("kobest_copa", "test", None)


def test_group_score_is_weighted_by_task_size(tokenizer_dir):
    model = random_model(tiny_config())
    settings = EvalSettings(tasks=list(TASKS), shots=[0], data_dir=str(DATA))
    results, _ = evaluate(NeoxkoScorer(model, load_tokenizer(tokenizer_dir)), settings, progress=False)
    sizes = [results[t]["0"]["n"] for t in TASKS]
    expected = sum(results[t]["0"]["acc"] * n for t, n in zip(TASKS, sizes, strict=True)) / sum(sizes)
    assert results["kobest"]["0"]["acc"] == pytest.approx(expected) and results["kobest"]["0"]["n"] == sum(sizes)


def test_cli_eval_bad_shots_and_hf_model_without_tokenizer(tmp_path, model_dir):
    out = subprocess.run([sys.executable, "-m", "neoxko", "eval", "--model", str(model_dir), "--shots", "0,five",
                          "--data-dir", str(DATA)], capture_output=True, text=True)
    assert out.returncode == 2 and "--shots must be comma-separated integers" in out.stderr
    shutil.copytree(model_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).unlink()
    out = subprocess.run([sys.executable, "-m", "neoxko", "eval", "--model", str(tmp_path / "m"), "--backend", "hf",
                          "--data-dir", str(DATA)], capture_output=True, text=True)
    assert out.returncode == 2 and "no tokenizer for" in out.stderr, out.stderr[-1500:]


def test_each_torchrun_rank_scores_on_its_own_gpu(monkeypatch):
    import torch

    from neoxko.evaluate.kobest import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device(None) == "cuda:3" and rank_device("cuda") == "cuda:3"
    assert rank_device("cuda:1") == "cuda:1" and rank_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device(None) == "cpu"
