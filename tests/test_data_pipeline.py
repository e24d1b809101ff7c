"""`neoxko data prepare` on a small corpus made here: every step, the report, resume, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import KOREAN_TEXT
from neoxko.data.prepare import PrepareConfig, Quality, prepare
from neoxko.data.shards import read_documents, token_shards
from neoxko.data.steps import (
    KobestDecontamination,
    KoreanQualityFilter,
    KoreanWordTokenizer,
    char_run_share,
    clean_text,
    duplicate_line_share,
)
from neoxko.errors import NeoxkoError
from neoxko.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

pytest.importorskip("datatrove")

LEAKED = "양반전은 박지원이 지은 한문 단편 소설로 양반의 무능과 허위를 풍자한 작품이다"


def documents() -> list[str]:
    """60 unique documents of 40 random words each (seeded), so no two are near duplicates."""
    rng = random.Random(0)
    words = [w for w in KOREAN_TEXT.split() if any("가" <= c <= "힣" for c in w)]
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    docs = documents()
    lines = docs[:30] + [
        docs[0],  # exact duplicate
        docs[1].rsplit(" ", 1)[0] + " 끝났다",  # near duplicate: the last word differs
        "짧다",  # too short
        "This line is written in English only, with no Korean at all in it.",  # low Hangul
        "ㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋ 재밌다",  # repetitive
        "★☆★☆★☆★☆ 대박 ★☆★☆★☆★☆ 이벤트 ★☆★☆★☆",  # symbols
        "문의는 010-1234-5678 로 주시고 입금은 국민 123456-78-901234 부탁드립니다. "
        "주민번호 850315-1234567 확인했습니다.",
        f"독후감: {LEAKED}. 재미있게 읽었다.",  # overlaps the KoBEST fixture below
    ]
    raw = "\n".join(lines).encode() + b"\n\xff\xfe broken bytes line\n"
    (folder / "a.txt").write_bytes(raw)
    jsonl = [json.dumps({"text": "<p>" + d + "&amp;</p>"}, ensure_ascii=False) for d in docs[30:]] + ["{not json"]
    (folder / "b.jsonl").write_text("\n".join(jsonl) + "\n", encoding="utf-8")
    (folder / "c.jsonl.gz").write_bytes(b"this is not gzip")
    kobest = folder.parent / (folder.name + "-kobest")
    for task, row in {"boolq": {"paragraph": LEAKED, "question": "양반전은 소설인가?"},
                      "copa": {"premise": "비가 왔다.", "alternative_1": "우산을 썼다.", "alternative_2": "해가 떴다."},
                      "wic": {"context_1": "[배]를 먹었다.", "context_2": "[배]를 탔다."},
                      "hellaswag": {"context": "아침을 먹었다.", "ending_1": "a", "ending_2": "b", "ending_3": "c",
                                    "ending_4": "d"},
                      "sentineg": {"sentence": "좋아요"}}.items():
        (kobest / task).mkdir(parents=True)
        (kobest / task / "test.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    return save_tokenizer(train_tokenizer(documents() + KOREAN_TEXT.splitlines(), vocab_size=500), folder)


def config(corpus: Path, tokenizer: Path, out: Path, **changes) -> PrepareConfig:
    base = dict(inputs=[str(corpus)], output=str(out), tokenizer=str(tokenizer), tasks=2, workers=2,
                kobest_dir=str(corpus.parent / (corpus.name + "-kobest")), minhash_buckets=4)
    return PrepareConfig(**(base | changes))


@pytest.fixture(scope="session")
def finished(corpus, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    prepare(config(corpus, tokenizer, out))
    return out


def test_report_counts_every_step(finished):
    report = json.loads((finished / "report.json").read_text())
    assert report["read"]["invalid_utf8_lines"] == 1 and report["read"]["bad_json_lines"] == 1
    assert report["read"]["unreadable_files"] == 1
    assert report["read"]["documents"] == 38 + 30
    q = report["quality"]
    reasons = ("dropped_too_short", "dropped_low_hangul", "dropped_repetitive", "dropped_symbols")
    assert [q[r] for r in reasons] == [1, 1, 1, 1]
    assert report["pii"] == {"rrn": 1, "tel": 1, "acc": 1, "documents_with_pii": 1}
    assert report["decontamination"]["matched_kobest_boolq"] == 1
    assert report["exact_dedup"]["duplicates_removed"] == 1
    assert report["minhash_dedup"]["near_duplicates_removed"] == 1
    assert report["output"]["documents"] == 60 + 1  # the unique documents and the PII one
    assert "| pii | tel | 1 |" in (finished / "report.md").read_text()
    matches = [json.loads(line) for f in (finished / "decontamination").glob("*.jsonl") for line in f.open()]
    assert [m["task"] for m in matches] == ["kobest_boolq"]


def test_shards_decode_back_to_the_cleaned_documents(finished, tokenizer):
    tok = load_tokenizer(tokenizer)
    texts = []
    for f in sorted((finished / "documents").glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in f.open(encoding="utf-8")]
    decoded = [tok.decode(d.tolist()) for shard in token_shards(finished / "tokens") for d in read_documents(shard)]
    assert decoded == [t + "<|endoftext|>" for t in texts]
    assert any("<|tel|>" in t and "<|acc|>" in t and "<|rrn|>" in t for t in texts)
    assert all("<p>" not in t and "&amp;" not in t for t in texts)
    assert all(d.dtype.itemsize == 2 for shard in token_shards(finished / "tokens") for d in read_documents(shard))


def _tokens(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "tokens").glob("*.ds*")) if not p.name.endswith("metadata")}


def test_killed_run_resumes_to_the_same_shards(corpus, tokenizer, finished, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "neoxko", "data", "prepare", str(corpus), "--output", str(out), "--tokenizer",
            str(tokenizer), "--workers", "2", "--kobest-dir", str(corpus.parent / (corpus.name + "-kobest"))]
    proc = subprocess.Popen(args + ["--minhash-buckets", "4"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    stage = out / "logs" / "4-minhash-sigs" / "completions"
    deadline = time.time() + 120
    while not (stage.exists() and any(stage.iterdir())) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()
    done = subprocess.run(args + ["--minhash-buckets", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tokens(out) == _tokens(finished)
    assert json.loads((out / "report.json").read_text())["output"] == \
        json.loads((finished / "report.json").read_text())["output"]


def test_output_folder_with_another_run_is_refused(corpus, tokenizer, finished):
    with pytest.raises(NeoxkoError, match=r"already holds a run with other settings \(quality differ\)"):
        prepare(config(corpus, tokenizer, finished, quality=Quality(min_chars=3)))


def test_non_empty_foreign_folder_is_refused(corpus, tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NeoxkoError, match="is not empty and holds no neoxko run"):
        prepare(config(corpus, tokenizer, tmp_path))


def test_tokenizer_without_special_tokens_is_refused_before_any_output(corpus, tokenizer_dir, tmp_path):
    with pytest.raises(NeoxkoError, match=r"the tokenizer has no <\|acc\|>"):
        prepare(config(corpus, tokenizer_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_empty_inputs(tokenizer, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(NeoxkoError, match="no input files"):
        prepare(config(tmp_path / "in", tokenizer, tmp_path / "out", kobest_dir=None))
    with pytest.raises(NeoxkoError, match="does not exist"):
        prepare(config(tmp_path / "nope", tokenizer, tmp_path / "out", kobest_dir=None))


def test_parquet_input(tokenizer, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "in").mkdir()
    docs = documents()[:10]
    pq.write_table(pa.table({"body": docs, "n": list(range(10))}), tmp_path / "in" / "part.parquet")
    report = prepare(config(tmp_path / "in", tokenizer, tmp_path / "out", kobest_dir=None, text_key="body"))
    assert report["read"]["documents"] == 10 and report["output"]["documents"] == 10


def test_hugging_face_dataset_input(tokenizer, tmp_path):
    """The datasets path (the hub when online) on a local JSON file: load_dataset("json", ...)."""
    pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents()[:12]))
    cfg = config(tmp_path, tokenizer, tmp_path / "out", inputs=[], kobest_dir=None, tasks=1, workers=1,
                 hf_dataset="json", hf_options={"data_files": str(rows), "split": "train"})
    report = prepare(cfg)
    assert report["output"]["documents"] == 12
    with pytest.raises(NeoxkoError, match="not both"):
        prepare(cfg.__class__(**{**cfg.__dict__, "inputs": [str(rows)], "output": str(tmp_path / "o2")}))


def test_slurm_executor_is_built_with_stage_dependencies(corpus, tokenizer, tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    from neoxko.data.prepare import build_executors

    cfg = config(corpus, tokenizer, tmp_path, executor="slurm", slurm_partition="gpu")
    executors = build_executors(cfg, tokenizer / "tokenizer.json")
    assert len(executors) == 7 and all(isinstance(e, SlurmPipelineExecutor) for e in executors)
    assert executors[-1].depends is executors[-2]
    from neoxko.data.executors import check_slurm

    with pytest.raises(NeoxkoError, match="needs --slurm-partition"):
        check_slurm(None)


def test_clean_text():
    assert clean_text("<b>굵게</b> &lt;태그&gt;\x00\x07 여러   칸\u200b\r\n\n\n\n끝") == "굵게 <태그> 여러 칸\n\n끝"
    assert clean_text("\u1100\u1161\u11a8") == "각"  # NFC joins conjoining jamo
    assert clean_text("<|acc|> 그대로") == "<|acc|> 그대로"  # our tokens are not markup


def test_quality_filter_reasons():
    from datatrove.data import Document

    f = KoreanQualityFilter()
    assert f.filter(Document("이 문장은 충분히 긴 한국어 문장입니다.", "1")) is True
    assert f.filter(Document("짧음", "2")) == (False, "too_short")
    assert f.filter(Document("mostly english words with 한글", "3")) == (False, "low_hangul")
    assert duplicate_line_share("같은 줄\n같은 줄\n다른 줄") == pytest.approx(8 / 12)
    assert char_run_share("ㅋㅋㅋㅋㅋ") == 1.0


def test_decontamination_finds_spans_despite_spacing():
    from datatrove.data import Document

    step = KobestDecontamination({"kobest_boolq": [LEAKED]}, report_folder="unused")
    spaced = "앞부분 " + LEAKED.replace(" ", "  ").replace("이다", "이다!") + " 뒷부분"
    assert step.filter(Document(spaced, "1")) == (False, "kobest_overlap")
    assert step.filter(Document("양반전은 박지원이 지은 소설이다. 전혀 다른 이야기가 이어진다.", "2")) is True
    assert KoreanWordTokenizer().word_tokenize("한국어 문장, test 123") == ["한국어", "문장", ",", "test", "123"]


def test_holdout_split_is_complete_disjoint_and_independent_of_tasks(corpus, tokenizer, finished, tmp_path):
    out = tmp_path / "out"
    report = prepare(config(corpus, tokenizer, out, tasks=1, workers=1, holdout=0.3))

    def texts(folder: Path) -> list[str]:
        return [json.loads(line)["text"] for f in sorted(folder.glob("*.jsonl")) for line in f.open(encoding="utf-8")]

    train, held = texts(out / "documents"), texts(out / "heldout" / "documents")
    assert 0 < len(held) < len(train)
    assert sorted(train + held) == sorted(texts(finished / "documents"))  # nothing lost, nothing twice
    assert report["heldout"]["documents"] == len(held) and report["output"]["documents"] == len(train)
    tok = load_tokenizer(tokenizer)
    shards = token_shards(out / "heldout" / "tokens")
    decoded = [tok.decode(d.tolist()) for shard in shards for d in read_documents(shard)]
    assert decoded == [t + "<|endoftext|>" for t in held]
    assert report["heldout"]["tokens"] == sum(len(d) for shard in shards for d in read_documents(shard))
    # the split follows document ids, so two tasks hold out the same documents
    again = prepare(config(corpus, tokenizer, tmp_path / "again", holdout=0.3))
    assert sorted(texts(tmp_path / "again" / "heldout" / "documents")) == sorted(held)
    assert again["heldout"] == report["heldout"]


def test_holdout_with_numeric_document_ids(tokenizer, tmp_path):
    """JSONL ids are often numbers; the split hashes them as text."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [json.dumps({"id": i, "text": d}, ensure_ascii=False) for i, d in enumerate(documents())]
    (folder / "docs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = prepare(PrepareConfig(inputs=[str(folder)], output=str(tmp_path / "out"), tokenizer=str(tokenizer),
                                   tasks=1, workers=1, minhash_buckets=4, holdout=0.3))
    assert report["heldout"]["documents"] > 0
    assert report["heldout"]["documents"] + report["output"]["documents"] == 60


def test_bad_holdout_is_refused(corpus, tokenizer, tmp_path):
    with pytest.raises(NeoxkoError, match="--holdout is a share of documents between 0 and 0.5"):
        prepare(config(corpus, tokenizer, tmp_path / "out", holdout=0.7))


def test_an_empty_shard_reads_as_no_tokens(tmp_path):
    """A task that got no documents (a small held-out share over several tasks) leaves an empty shard."""
    from neoxko.data.shards import read_tokens

    (tmp_path / "00001.ds").write_bytes(b"")
    assert len(read_tokens(tmp_path / "00001.ds")) == 0


def test_a_rerun_whose_input_files_changed_is_refused(tmp_path, tokenizer):
    from neoxko.data.prepare import claim_output

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("첫 문서\n", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("둘째 문서\n", encoding="utf-8")
    cfg = config(tmp_path / "in", tokenizer, tmp_path / "out")
    claim_output(cfg)
    claim_output(cfg)  # the same files: a resume
    (tmp_path / "in" / "a0.txt").write_text("끼어든 문서\n", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("둘째 문서가 바뀌었다\n", encoding="utf-8")
    with pytest.raises(NeoxkoError, match="the input files changed since .* \\(added: a0.txt; changed: b.txt\\)"):
        claim_output(cfg)


def test_input_whose_documents_are_all_dropped_says_so(tmp_path, tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("짧다\n응\n", encoding="utf-8")
    with pytest.raises(NeoxkoError, match="no document survived cleaning and filtering \\(2 read; dropped: too_short 2\\)"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), tokenizer=str(tokenizer)))


def test_a_damaged_parquet_and_a_huge_line_are_counted_and_skipped(tmp_path, tokenizer):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.txt").write_text("\n".join(documents()[:20]) + "\n" + "가나다 " * 400_000 + "\n", encoding="utf-8")
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not really parquet")
    report = prepare(PrepareConfig(inputs=[str(folder)], output=str(tmp_path / "out"), tokenizer=str(tokenizer),
                                   tasks=1, workers=1, minhash_buckets=4))
    assert report["read"]["unreadable_files"] == 1 and report["read"]["too_long_documents"] == 1
    assert report["output"]["documents"] == 20


def test_the_command_shows_its_stages_and_keeps_datatrove_logs_in_a_file(tmp_path, tokenizer):
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(documents()) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "neoxko", "data", "prepare", str(tmp_path / "in"), "--tokenizer",
                          str(tokenizer), "--output", str(tmp_path / "out"), "--minhash-buckets", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 14 and all(line.startswith("neoxko: data prepare ") for line in lines), lines[:5]
    assert "Launching pipeline" in (tmp_path / "out" / "logs" / "datatrove.log").read_text(encoding="utf-8")
