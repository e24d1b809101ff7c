"""neoxko as an lm-eval model (`--model neoxko`): the same numbers as `--model hf` on lm-eval's own KoBEST task
files, rolling log-likelihoods equal to `neoxko perplexity`, generate_until equal to `neoxko generate`, and the
command lines that reach it."""

import math
import subprocess
import sys

import numpy as np
import pytest
from lm_eval_tasks import TASKS, lm_eval_tasks

from conftest import random_model, tiny_config
from neoxko import load_model, load_tokenizer, save_model

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def folder(long_model_dir):
    return long_model_dir


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return lm_eval_tasks(tmp_path_factory.mktemp("lm_eval") / "tasks")


def test_model_neoxko_scores_kobest_as_model_hf_does(folder, tasks):
    """lm-eval's own KoBEST YAMLs at 2 shots, on local data: acc, acc_norm and F1 within 1e-6 of --model hf on the
    same weights, and every document's log-likelihoods within 1e-4."""
    from lm_eval.tasks import TaskManager

    import neoxko.evaluate.harness  # noqa: F401 - registers --model neoxko

    names = [f"neoxko_{t}" for t in TASKS]
    results = {}
    for model, args in (("neoxko", f"pretrained={folder},dtype=float32"),
                        ("hf", f"pretrained={folder},dtype=float32,device=cpu")):
        results[model] = lm_eval.simple_evaluate(model=model, model_args=args, tasks=names, num_fewshot=2,
                                                 task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                                 random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                                 fewshot_random_seed=1234, batch_size=4)
    ours, theirs = results["neoxko"], results["hf"]
    for name in names:
        for metric, value in theirs["results"][name].items():
            if isinstance(value, float) and not metric.startswith("alias"):
                assert ours["results"][name][metric] == pytest.approx(value, abs=1e-6), (name, metric)
        a = sorted(ours["samples"][name], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert len(a) == len(b) >= 3
        for x, y in zip(a, b, strict=True):
            ll_x = [r[0][0] for r in x["resps"]]
            ll_y = [r[0][0] for r in y["resps"]]
            np.testing.assert_allclose(ll_x, ll_y, atol=1e-4, rtol=0)


def _instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_rolling_equals_neoxko_perplexity(tokenizer_dir, tmp_path):
    """lm-eval's rolling windows (end-of-text first, disjoint windows of the whole context) over a document of
    exactly two windows give the log-likelihood `neoxko perplexity` gives over [end-of-text] + its tokens."""
    import shutil

    from neoxko.evaluate.harness import NeoxkoLM
    from neoxko.evaluate.perplexity import perplexity

    save_model(random_model(tiny_config(max_position_embeddings=32), seed=2), tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    lm = NeoxkoLM(pretrained=str(tmp_path), dtype="float32")
    tokenizer = load_tokenizer(tmp_path)
    text, ids = "", []
    for word in "가나다 라마바 사아자 차카타 파하 " * 40:
        text += word
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= 64:
            break
    while len(ids) > 64:  # exactly two 32-token windows
        text = text[:-1]
        ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 64
    [rolling] = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    ppl = perplexity(load_model(tmp_path, dtype="float32"), np.array([tokenizer.eos_id] + ids), 32, progress=False)
    assert ppl["tokens"] == 64
    assert rolling == pytest.approx(-ppl["loss"] * ppl["tokens"], abs=1e-3)
    assert math.isfinite(rolling)


def test_generate_until_equals_neoxko_generate_token_for_token(folder):
    from neoxko.evaluate.harness import NeoxkoLM
    from neoxko.generate import generate_tokens

    lm = NeoxkoLM(pretrained=str(folder), dtype="float32", batch_size=3)
    tokenizer = load_tokenizer(folder)
    prompts = ["오늘은 날씨가", "한국어 문장을", "질문: 서울은 어디에 있나요?\n답변:"]
    requests = [_instance("generate_until", (p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}))
                for p in prompts]
    got = lm.generate_until(requests)
    assert any(got)  # (the tiny random model writes something before its end-of-text token)
    model = load_model(folder, dtype="float32")
    for prompt, text in zip(prompts, got, strict=True):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        tokens = [int(t) for t in generate_tokens(model, [ids], 12, eos_id=tokenizer.eos_id)]
        tokens = tokens[:tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens
        assert text == tokenizer.decode(tokens, skip_special_tokens=True).split("\n\n")[0]
    # sampled, seeded: reproducible
    sampled = [_instance("generate_until", (prompts[0], {"until": [], "max_gen_toks": 8, "do_sample": True,
                                                          "temperature": 1.0, "seed": 3}))]
    assert lm.generate_until(sampled) == lm.generate_until(sampled)


def test_the_command_lines_reach_lm_eval(folder, tasks, capsys):
    import logging

    from neoxko.cli import main  # in process: lm-eval is imported once

    logger = logging.getLogger("lm_eval")
    state = (logger.level, logger.propagate, list(logger.handlers))
    try:  # lm-eval's command line sets its logger up for a process of its own; the next tests want it as it was
        assert main(["harness", "--model", "neoxko", "--model_args", f"pretrained={folder}", "--tasks",
                     "neoxko_kobest_copa", "--include_path", str(tasks), "--limit", "2"]) == 0
    finally:
        logger.setLevel(state[0])
        logger.propagate, logger.handlers[:] = state[1], state[2]
    printed = capsys.readouterr()
    assert "neoxko_kobest_copa" in printed.out and "acc" in printed.out
    assert main(["eval", "--model", str(folder), "--tasks", "neoxko_kobest_copa", "--include-path", str(tasks),
                 "--shots", "0", "--limit", "2"]) == 0
    printed = capsys.readouterr()
    assert "--model neoxko" in printed.out and "neoxko_kobest_copa" in printed.out
    assert main(["eval", "--model", str(folder), "--tasks", "no_such_task", "--include-path", str(tasks)]) == 2
    assert "lm-eval knows no task no_such_task" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "neoxko", "harness", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--model_args" in out.stdout  # lm-eval's own parser, reached by the command


def test_a_missing_lm_eval_is_named():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from neoxko.errors import NeoxkoError\n"
            "try:\n    import neoxko.evaluate.harness\nexcept NeoxkoError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs lm-evaluation-harness: pip install 'neoxko[eval]'" in out


def test_bad_model_args_and_requests_are_named(folder):
    from neoxko.errors import NeoxkoError
    from neoxko.evaluate.harness import NeoxkoLM
    from neoxko.evaluate.harness_generate import parse_gen_kwargs

    with pytest.raises(NeoxkoError, match="unknown neoxko model arg.s. pretraind; the ones it takes: pretrained"):
        NeoxkoLM(pretraind=str(folder))
    with pytest.raises(NeoxkoError, match="dtype 'int3' is not one neoxko loads; use one of float32"):
        NeoxkoLM(pretrained=str(folder), dtype="int3")
    with pytest.raises(NeoxkoError, match="generate_until's arguments must be a dict, got str"):
        parse_gen_kwargs("until=x", "<|endoftext|>")
    with pytest.raises(NeoxkoError, match="'until' must be a string or a list of strings, got 3"):
        parse_gen_kwargs({"until": 3}, "<|endoftext|>")
    lm = NeoxkoLM(pretrained=str(folder), dtype="float32")
    with pytest.raises(NeoxkoError, match="continuation encodes to no tokens"):
        lm._loglikelihood_tokens([(None, [5, 6], [])])

