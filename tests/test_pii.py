"""PII replacement: the labelled cases in the repo, the shared dev set's thresholds, tokens, counts."""

import json
import random
import re
from pathlib import Path

import pytest

from conftest import SHARED
from neoxko.data.pii import Span, find_pii, replace_pii, replace_pii_counted
from neoxko.data.pii_score import errors, read_labelled, score

CASES = Path(__file__).parent / "fixtures" / "pii_cases.txt"
DEV = SHARED / "pii" / "pii_dev.jsonl"
_MARK = re.compile(r"\[\[(rrn|tel|acc):(.+?)\]\]")


def read_cases() -> list[tuple[str, list[Span]]]:
    items = []
    for line in CASES.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        text, spans, last = "", [], 0
        for m in _MARK.finditer(line):
            text += line[last:m.start()]
            spans.append(Span(len(text), len(text) + len(m.group(2)), m.group(1)))
            text += m.group(2)
            last = m.end()
        items.append((text + line[last:], spans))
    return items


def test_repo_cases_are_all_right():
    items = read_cases()
    assert len(items) >= 40
    assert errors(items) == []


@pytest.mark.skipif(not DEV.exists(), reason="../shared/pii not present (fresh clone without shared data)")
def test_dev_set_meets_the_issue_thresholds():
    report = score(read_labelled(DEV))
    for label in ("rrn", "tel", "acc"):
        counts = report.strict[label]
        assert counts.precision >= 0.97 and counts.recall >= 0.97, (label, report.table())
    assert report.negative_changed / report.negative_lines <= 0.02


def test_tokens_and_counts():
    text = "연락처 010-1234-5678, 주민번호 850315-1234567, 국민 123456-78-901234 입금"
    out, counts = replace_pii_counted(text)
    assert out == "연락처 <|tel|>, 주민번호 <|rrn|>, 국민 <|acc|> 입금"
    assert counts == {"tel": 1, "rrn": 1, "acc": 1}
    assert replace_pii("숫자 없는 문장") == "숫자 없는 문장"


def test_no_word_boundary_trap_next_to_hangul():
    assert replace_pii("번호는010-9876-5432입니다") == "번호는<|tel|>입니다"


def test_spans_never_cut_a_digit_run():
    for text, _ in read_cases():
        for s in find_pii(text):
            assert not (s.start > 0 and text[s.start - 1].isdigit() and text[s.start].isdigit())
            assert not (s.end < len(text) and text[s.end].isdigit() and text[s.end - 1].isdigit())


def _neoxko(*args, stdin: bytes = b""):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "neoxko", *args], input=stdin, capture_output=True)


def test_stream_command_text_jsonl_and_invalid_utf8(tmp_path):
    out = _neoxko("data", "pii", stdin="문의 010-1234-5678 주세요\n".encode() + b"\xff\xfe 010-2222-3333\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "문의 <|tel|> 주세요\n".encode() + b"\xff\xfe <|tel|>\n"
    assert "tel 2" in out.stderr.decode() and "invalid UTF-8 (passed through): 1" in out.stderr.decode()
    (tmp_path / "in.jsonl").write_text('{"text": "국민 123456-78-901234 입금", "id": 7}\n')
    out = _neoxko("data", "pii", str(tmp_path / "in.jsonl"), "--text-key", "text", "--output", str(tmp_path / "o"))
    assert json.loads((tmp_path / "o").read_text()) == {"text": "국민 <|acc|> 입금", "id": 7}


def test_stream_command_bad_input(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    out = _neoxko("data", "pii", str(tmp_path / "in.jsonl"), "--text-key", "text")
    assert out.returncode == 2 and b"in.jsonl:2: not a JSON object with a 'text' text field" in out.stderr
    out = _neoxko("data", "pii", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and b"cannot open" in out.stderr and b"Traceback" not in out.stderr


@pytest.mark.parametrize("seed", range(5))
def test_streamed_masking_equals_whole_text_masking_and_never_leaks_early(seed):
    from neoxko.data.pii import PIIStream

    rng = random.Random(seed)
    for text, spans in read_cases():
        guard, emitted = PIIStream(), ""
        i = 0
        while i < len(text):
            n = rng.randint(1, 5)
            emitted += guard.push(text[i:i + n])
            i += n
            # what is out must always be a prefix of the masked whole: where a value is, the masked whole
            # has its token, so no digit of a value can have gone out before the value was decided
            assert replace_pii(text).startswith(emitted), (text, emitted)
        emitted += guard.flush()
        assert emitted == replace_pii(text)
        assert guard.total == len(spans) == sum(replace_pii_counted(text)[1].values())


@pytest.mark.parametrize("prompt,continuation", [
    ("주민번호 850315-1234567", "12 입니다"), ("연락처 010-1234-5678", "1 로"), ("계좌번호 3333-01-1234567", "99"),
    ("전화 010-1234-", "5678 로 주세요"),  # a number split across the prompt and the continuation
])
def test_an_echoed_prompt_keeps_its_pii_masked_whatever_the_model_adds(prompt, continuation):
    """`echo` with `mask_pii`: digits the model appends must not turn the prompt's number into a non-match."""
    from neoxko.data.pii import PIIStream

    guard = PIIStream()
    out = guard.push_prompt(prompt) + "".join(guard.push(c) for c in continuation) + guard.flush()
    digits = [c for c in prompt if c.isdigit()]
    assert "<|" in out and "".join(c for c in out if c.isdigit()) != "".join(digits) + "".join(
        c for c in continuation if c.isdigit()), out
    assert not any(prompt[i:i + 4] in out for i in range(len(prompt) - 3) if prompt[i:i + 4].isdigit()), out
