"""Evaluation under torchrun (gloo on CPU, two processes) gives one process's numbers: `neoxko eval` on 25 COPA
documents and `neoxko harness` on 7 (counts two ranks do not share evenly), few-shot, ko-small in bfloat16 with
small batches; the metrics and every document's log-likelihoods (and generated texts) equal, nothing shown twice."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from lm_eval_tasks import FIXTURE, lm_eval_tasks

from conftest import hf_twin, random_model, tiny_config

pytest.importorskip("lm_eval")

DOCS = 25  # odd, and enough: splitting 21 by document left the bfloat16 sums as they were (on CPU)
# The same thread count for both runs (torchrun's default): kernels split sums by thread.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GENERATE_TASK = """task: copa_generate
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: generate_until
doc_to_text: "{{{{premise}}}} 그래서"
doc_to_target: "{{{{alternative_1}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def kobest(tmp_path_factory) -> Path:
    """A KoBEST-shaped folder whose COPA test split holds 25 documents made of the fixture's ten rows (premise and
    question of one, the choices of another), train as in the fixture."""
    rows = [json.loads(line) for split in ("test", "train") for line in (FIXTURE / "copa" / f"{split}.jsonl").open()]
    docs = [{**rows[i % 10], **{k: rows[(3 * i + i // 10) % 10][k] for k in ("alternative_1", "alternative_2")},
             "label": i % 2} for i in range(DOCS)]
    folder = tmp_path_factory.mktemp("kobest")
    (folder / "copa").mkdir()
    (folder / "copa" / "test.jsonl").write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
    shutil.copy(FIXTURE / "copa" / "train.jsonl", folder / "copa" / "train.jsonl")
    return folder


def launch(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", "neoxko", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(free_port()), "-m", "neoxko", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def printed_twice(torchrun: str, one: str) -> list[str]:
    """Log messages and progress bars (a bar counts where it starts, at 0%) that torchrun's ranks together show more
    often than one process does."""
    return [line for line, n in shown(torchrun).items() if n > max(1, shown(one)[line])]


def shown(stderr: str) -> Counter:
    lines = Counter()
    for line in re.split(r"[\r\n]", stderr):
        line = re.sub(r"^\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d ", "", line.strip())  # lm-eval's timestamp
        if line and ("%|" not in line or re.search(r"\s0%\|", line)):
            lines[line] += 1
    return lines


@pytest.mark.distributed
def test_harness_under_torchrun_gives_one_process_numbers(kobest, tmp_path):
    """lm-eval's KoBEST COPA at 2 shots and a generation task on 7 documents: the same metrics, log-likelihoods and
    texts (lm-eval's own split by rank drew other few-shot examples on each rank)."""
    tasks = lm_eval_tasks(tmp_path / "tasks", kobest)
    (tasks / "copa_generate.yaml").write_text(GENERATE_TASK.format(test=kobest / "copa" / "test.jsonl"))
    args = ["harness", "--model", "neoxko", "--model_args", "pretrained=ko-small,batch_tokens=256", "--batch_size", "2",
            "--tasks", "neoxko_kobest_copa,copa_generate", "--include_path", str(tasks), "--num_fewshot", "2",
            "--limit", "7", "--log_samples"]
    runs = {n: launch(n, [*args, "--output_path", str(tmp_path / str(n))]) for n in (1, 2)}
    (metrics, samples), (metrics_2, samples_2) = (_harness_outputs(tmp_path / str(n)) for n in (1, 2))
    assert metrics == pytest.approx(metrics_2, abs=1e-6) and ("neoxko_kobest_copa", "acc,none") in metrics
    assert sorted(samples) == sorted(samples_2) == [(task, i) for task in ("copa_generate", "neoxko_kobest_copa")
                                                    for i in range(7)]
    for key, resps in samples.items():
        if key[0] == "copa_generate":
            assert resps == samples_2[key]
        else:  # (log-likelihood, greedy) per choice
            assert [float(ll) for ll, _ in resps] == pytest.approx([float(ll) for ll, _ in samples_2[key]], abs=1e-6)
    assert runs[1].stdout.count("neoxko_kobest_copa|") == runs[2].stdout.count("neoxko_kobest_copa|") == 1
    assert printed_twice(runs[2].stderr, runs[1].stderr) == []


def _harness_outputs(folder: Path) -> tuple[dict, dict]:
    """({(task, metric): value}, {(task, doc_id): responses}) from lm-eval's results and samples files."""
    [results] = folder.glob("*/results_*.json")
    metrics = {(task, metric): value for task, values in json.loads(results.read_text())["results"].items()
               for metric, value in values.items() if isinstance(value, float)}
    samples = {}
    for path in folder.glob("*/samples_*.jsonl"):
        for sample in map(json.loads, path.open()):
            task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
            samples[task, sample["doc_id"]] = [r[0] for r in sample["resps"]]
    return metrics, samples


@pytest.mark.distributed
def test_eval_under_torchrun_gives_one_process_numbers(kobest, tmp_path):
    """neoxko's own KoBEST at 0 and 2 shots: the same results.json, samples and printed table."""
    args = ["eval", "--model", "ko-small", "--tasks", "kobest_copa", "--shots", "0,2", "--data-dir", str(kobest),
            "--batch-tokens", "512"]
    runs = {n: launch(n, [*args, "--output", str(tmp_path / str(n))]) for n in (1, 2)}
    one, two = (json.loads((tmp_path / str(n) / "results.json").read_text())["results"] for n in (1, 2))
    assert one == two and one["kobest_copa"]["2"]["n"] == DOCS
    samples = {n: [json.loads(line) for line in (tmp_path / str(n) / "samples.jsonl").open()] for n in (1, 2)}
    assert len(samples[1]) == len(samples[2]) == 2 * DOCS
    for a, b in zip(samples[1], samples[2], strict=True):
        assert a.pop("loglikelihoods") == pytest.approx(b.pop("loglikelihoods"), abs=1e-6)
        assert a == b
    assert runs[1].stdout == runs[2].stdout  # the table, printed once
    assert printed_twice(runs[2].stderr, runs[1].stderr) == []


@pytest.mark.parametrize("backend", ["neoxko", "hf"])
def test_each_batch_scored_alone_gives_the_scores_it_gets_among_all(tokenizer_dir, backend):
    """What ranks rely on to deal out batches: scoring one of scorer_batches' batches by itself gives its rows the
    very scores (bit for bit) they get in one call over every item, contexts cut to the window included."""
    from neoxko.evaluate.kobest import scorer_batches
    from neoxko.evaluate.scoring import HFScorer, Item, NeoxkoScorer

    model = random_model(tiny_config(max_position_embeddings=32))
    scorer = NeoxkoScorer(model, None, batch_tokens=96) if backend == "neoxko" else HFScorer(hf_twin(model), None, 96)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(4, 384, (n,), generator=g).tolist()
    items = [Item(ids(int(n)), [ids(1 + k % 3) for k in range(2 + n % 3)]) for n in torch.randint(1, 40, (13,))]
    whole = scorer.loglikelihoods(items)
    batches = scorer_batches(scorer, items)
    assert len(batches) > 2 and sum(len(which) for batch in batches for _, _, which in batch) == sum(
        len(item.branches) for item in items)
    for batch in batches:
        alone = scorer.loglikelihoods([row for _, row, _ in batch])
        for (n, _, which), scores in zip(batch, alone, strict=True):
            assert scores == [whole[n][i] for i in which]


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch, capsys):
    """NCCL's collectives run on the current GPU: a rank sets cuda:LOCAL_RANK before it joins the group, and under
    torchrun the model goes there too, whatever cuda index lm-eval asks for (its default is cuda:0)."""
    import torch.distributed as dist

    from neoxko.evaluate.harness import lm_eval_device
    from neoxko.evaluate.kobest import join_torchrun

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert join_torchrun() == (1, 2)
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert lm_eval_device("cuda:0", 1, 2) == "cuda:1" and lm_eval_device("cuda", 1, 2) == "cuda:1"
    assert lm_eval_device("cuda:0", 0, 1) == "cuda:0" and lm_eval_device("cpu", 1, 2) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lm_eval_device("cuda:0", 1, 2) == "cpu" and capsys.readouterr().err == ""  # rank 0 says it, once
    assert lm_eval_device("cuda:0", 0, 2) == "cpu" and "there is no GPU" in capsys.readouterr().err
