"""Tokenizer training, the release's special-token layout, round trips, and parity with transformers."""

import json
import random
import subprocess
import sys

import pytest

from conftest import KOREAN_TEXT, SHARED
from neoxko.errors import CheckpointError
from neoxko.tokenizer import (
    load_tokenizer,
    read_texts,
    require_special_tokens,
    save_tokenizer,
    train_tokenizer,
)

REFERENCE_TOKENIZER = SHARED / "reference" / "polyglot-ko" / "eleutherai-polyglot-mbbpe-2022-07"

TRICKY = [
    "대한민국은 민주공화국이다.", "ㄱㄴㄷ ㅏㅑㅓ", "\u1100\u1161\u11a8",  # compatibility and conjoining jamo
    "漢字 한자 混用", "😀👍🏽👨‍👩‍👧", "ＡＢＣ１２３！", "tab\tnew\nline\r\x00\x1b[0m", "  앞뒤 공백  ",
    "<|acc|><|tel|><|rrn|>", "계좌<|acc|>로 보내", "<|endoftext|>다음 문서", "\ufeffBOM", "e\u0301 é",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts = KOREAN_TEXT.splitlines() * 20
    folder = tmp_path_factory.mktemp("trained")
    return save_tokenizer(train_tokenizer(texts, vocab_size=600, min_frequency=1), folder)


def test_release_layout(trained):
    tok = load_tokenizer(trained)
    ids = [tok.token_to_id(t) for t in ("<|unused0|>", "<|unused1|>", "<|endoftext|>", "<|sep|>")]
    assert ids == [0, 1, 2, 3]
    assert [tok.token_to_id(t) for t in ("<|acc|>", "<|tel|>", "<|rrn|>")] == [600, 601, 602]
    assert tok.eos_id == 2 and tok.vocab_size == 603
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and "<|tel|>" in config["additional_special_tokens"]


def test_round_trip_any_unicode(trained):
    tok = load_tokenizer(trained)
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xAC00, 0xD7A3), (0x3131, 0x318E), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0, 0x1F),
              (0xFF01, 0xFF5E), (0x1100, 0x11FF)]
    randoms = ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in TRICKY + randoms:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_atomic_and_the_cards_spelling_is_accepted(trained):
    tok = load_tokenizer(trained)
    acc, tel, rrn = (tok.token_to_id(t) for t in ("<|acc|>", "<|tel|>", "<|rrn|>"))
    assert tok.encode("계좌<|acc|>로") .count(acc) == 1
    assert tok.encode("전화 <|tell|> 주민 <|rrn|>") == tok.encode("전화 <|tel|> 주민 <|rrn|>")
    assert tel in tok.encode("<|tell|>") and rrn in tok.encode("x<|rrn|>x")
    assert tok.encode_batch(["<|tell|>", "가"]) == [tok.encode("<|tell|>"), tok.encode("가")]


def test_transformers_autotokenizer_gives_identical_ids(trained):
    transformers = pytest.importorskip("transformers")
    ours, theirs = load_tokenizer(trained), transformers.AutoTokenizer.from_pretrained(trained)
    for text in TRICKY + KOREAN_TEXT.splitlines():
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == 2


@pytest.mark.skipif(not REFERENCE_TOKENIZER.exists(), reason="../shared/reference not present (fresh clone)")
def test_polyglot_2022_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    ours, theirs = load_tokenizer(REFERENCE_TOKENIZER), transformers.AutoTokenizer.from_pretrained(REFERENCE_TOKENIZER)
    for text in TRICKY + KOREAN_TEXT.splitlines():
        assert theirs.encode(text) == ours.encode(text), text
    require_special_tokens(ours)  # it has <|endoftext|>, <|acc|>, <|tel|>, <|rrn|>


def test_tokenizer_without_pii_tokens_is_refused(tokenizer_dir):
    with pytest.raises(CheckpointError, match=r"the tokenizer has no <\|acc\|>, <\|tel\|>, <\|rrn\|>"):
        require_special_tokens(load_tokenizer(tokenizer_dir))


def test_read_texts_names_a_bad_jsonl_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "가"}\n{"body": "나"}\n')
    with pytest.raises(CheckpointError, match=r"a.jsonl:2: not a JSON object with a 'text' field"):
        list(read_texts([tmp_path / "a.jsonl"]))


def test_read_texts_skips_and_reports_invalid_utf8(tmp_path):
    (tmp_path / "a.txt").write_bytes("가나다\n".encode() + b"\xff\xfe bad\n" + "라마\n".encode())
    with pytest.warns(UserWarning, match=r"a.txt: skipped 1 line\(s\) that are not UTF-8 \(the first is line 2\)"):
        assert list(read_texts([tmp_path / "a.txt"])) == ["가나다", "라마"]


def test_cli_trains_a_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text(KOREAN_TEXT)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in KOREAN_TEXT.splitlines()))
    out = subprocess.run([sys.executable, "-m", "neoxko", "tokenizer", "train", str(tmp_path / "a.txt"),
                          str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "tok"), "--vocab-size", "400"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "403 tokens (embedding rows: 512)" in out.stdout
    assert load_tokenizer(tmp_path / "tok").token_to_id("<|rrn|>") == 402
    assert "warning" not in out.stderr
    small = subprocess.run([sys.executable, "-m", "neoxko", "tokenizer", "train", str(tmp_path / "a.txt"),
                            "--output", str(tmp_path / "small"), "--vocab-size", "30000"], capture_output=True, text=True)
    learned = load_tokenizer(tmp_path / "small").vocab_size - 3
    assert small.returncode == 0 and learned < 30000
    assert (f"neoxko: warning: the corpus gave only {learned:,} BPE entries of the 30,000 asked for, so the PII "
            f"tokens <|acc|>, <|tel|>, <|rrn|> get ids {learned}-{learned + 2}, not 30000-30002") in small.stderr
    out = subprocess.run([sys.executable, "-m", "neoxko", "tokenizer", "train", str(tmp_path / "nope.txt"),
                          "--output", str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and "input file(s) not found" in out.stderr
