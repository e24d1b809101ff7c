"""PII replacement: the labelled cases in the repo, the shared dev set's thresholds, tokens, counts."""

import json
import random
import re
from pathlib import Path

import pytest

from conftest import SHARED
from neoxko.pii.replace import Span, find_pii, replace_pii, replace_pii_counted
from neoxko.pii.score import errors, read_labelled, score

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
        assert counts.precision >= 0.98 and counts.recall >= 0.98, (label, report.table())
    assert report.negative_changed / report.negative_lines <= 0.005


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
    assert "tel 2" in out.stderr.decode() and "1 line(s) are not utf-8: their bytes passed through" in out.stderr.decode()
    (tmp_path / "in.jsonl").write_text('{"text": "국민 123456-78-901234 입금", "id": 7}\n')
    out = _neoxko("data", "pii", str(tmp_path / "in.jsonl"), "--text-key", "text", "--output", str(tmp_path / "o"))
    assert json.loads((tmp_path / "o").read_text()) == {"text": "국민 <|acc|> 입금", "id": 7}


def test_stream_command_bad_input(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    out = _neoxko("data", "pii", str(tmp_path / "in.jsonl"), "--text-key", "text")
    assert out.returncode == 2 and b"in.jsonl:2: the record has no 'text' text field; fix the record" in out.stderr
    out = _neoxko("data", "pii", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and b"cannot open" in out.stderr and b"Traceback" not in out.stderr


@pytest.mark.parametrize("seed", range(5))
def test_streamed_masking_equals_whole_text_masking_and_never_leaks_early(seed):
    from neoxko.pii.stream import PIIStream

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
    from neoxko.pii.stream import PIIStream

    guard = PIIStream()
    out = guard.push_prompt(prompt) + "".join(guard.push(c) for c in continuation) + guard.flush()
    digits = [c for c in prompt if c.isdigit()]
    assert "<|" in out and "".join(c for c in out if c.isdigit()) != "".join(digits) + "".join(
        c for c in continuation if c.isdigit()), out
    assert not any(prompt[i:i + 4] in out for i in range(len(prompt) - 3) if prompt[i:i + 4].isdigit()), out


# -- issue 13: text the rules were not tuned on --------------------------------------------------------------
def _generated(seed: int, lines: int):
    from neoxko.pii.synth import generate

    records = generate(seed, lines)
    items = [(r["text"], [Span(s["start"], s["end"], "tel" if s["label"] == "tell" else s["label"]) for s in r["spans"]])
             for r in records]
    return records, items


def test_the_generator_is_seeded_labelled_by_construction_and_covers_every_kind():
    from neoxko.pii.synth import KINDS

    records, items = _generated(5, 1400)
    assert records == _generated(5, 1400)[0] and records != _generated(6, 1400)[0]
    assert {r["kind"] for r in records} == set(KINDS)
    assert sum(not r["spans"] for r in records) / len(records) >= 0.40
    dev = {json.loads(line)["text"] for line in DEV.open(encoding="utf-8")} if DEV.exists() else set()
    assert not dev & {r["text"] for r in records}  # not written from the dev set's lines
    for text, spans in items:
        for a, b in zip(spans, spans[1:], strict=False):
            assert a.end <= b.start
        for s in spans:
            value = text[s.start:s.end].translate(str.maketrans("０１２３４５６７８９", "0123456789"))
            assert value[0] in "0123456789+(" and value[-1].isdigit(), (text, s)
            assert not (s.start and text[s.start - 1].isdigit()) and not (s.end < len(text) and text[s.end].isdigit())


def test_held_out_generated_text_meets_the_targets():
    """Tuned on seed 1; seed 2 is held out: strict P and R >= 0.98 per label, <= 0.5% negative lines touched,
    text outside the tokens unchanged."""
    records, items = _generated(2, 2800)
    report = score(items)
    for label in ("rrn", "tel", "acc"):
        counts = report.strict[label]
        assert counts.precision >= 0.98 and counts.recall >= 0.98, (label, report.table())
    assert report.negative_changed / report.negative_lines <= 0.005
    assert report.collateral_chars == 0


@pytest.mark.parametrize("text, expected", [
    ("이름,연락처,주민등록번호\n김민수,010-1234-5678,850315.1234567\n", "이름,연락처,주민등록번호\n김민수,<|tel|>,<|rrn|>\n"),
    ("| 이름 | 계좌 | 은행 |\n|---|---|---|\n| 김민수 | 110123456789 | 신한 |", "| 이름 | 계좌 | 은행 |\n|---|---|---|\n| 김민수 | <|acc|> | 신한 |"),
    ("이름\t휴대폰\t주문번호\n이서연\t01098765432\t230629-3488523", "이름\t휴대폰\t주문번호\n이서연\t<|tel|>\t230629-3488523"),
    ("2024-03-05T10:22:13 INFO sms.send to=01012345678 status=200", "2024-03-05T10:22:13 INFO sms.send to=<|tel|> status=200"),
    ('{"tel": "0505-1234-5678", "order_no": "8801234567890"}', '{"tel": "<|tel|>", "order_no": "8801234567890"}'),
    ("예약 변경/취소 1588-1234", "예약 변경/취소 <|tel|>"), ("사무실 0215551234 / Fax 0319998888", "사무실 <|tel|> / Fax <|tel|>"),
    ("입금은 기업은행 123-456789-01-012 예금주 김민수, 문자 010-2345-6789 로", "입금은 기업은행 <|acc|> 예금주 김민수, 문자 <|tel|> 로"),
    ("기업은행 평생계좌 010-1234-5678 로 보내 주세요", "기업은행 평생계좌 <|acc|> 로 보내 주세요"),
    ("외국인등록번호 850315-5234567", "외국인등록번호 <|rrn|>"),
    ("농협중앙회 301-1234-5678-91 로 입금", "<|acc|>".join(["농협중앙회 ", " 로 입금"])),
    ("송금: 도이치은행 123-456789-012", "송금: 도이치은행 <|acc|>"),
    ("의약품 표준코드 8806123456781 재고", "의약품 표준코드 8806123456781 재고"),
    ("승인번호 16422062, ISSN 1598-1234, 이순신(1545-1598)", "승인번호 16422062, ISSN 1598-1234, 이순신(1545-1598)"),
    # a quoted CSV field holds its own commas: the columns still line up with their header
    ('이름,금액,법인등록번호\n권혁진,"286,650원",110111-8591992\n조은비,"1,935,296원",134511-7804683\n',
     '이름,금액,법인등록번호\n권혁진,"286,650원",110111-8591992\n조은비,"1,935,296원",134511-7804683\n'),
    ('이름,"메모, 비고",연락처\n김민수,"부재 시, 문자",010-1234-5678\n', '이름,"메모, 비고",연락처\n김민수,"부재 시, 문자",<|tel|>\n'),
    # 14 digits that read as a date and a time are a timestamp (POLICY.md); 12 after an account word, an account
    ("bank=광주은행; 계좌=197401012138;", "bank=광주은행; 계좌=<|acc|>;"),
    ("급여계좌: 부산은행 790-2594-2317-68\n일시: 20240318150926", "급여계좌: 부산은행 <|acc|>\n일시: 20240318150926"),
])
def test_structure_and_the_new_kinds(text, expected):
    assert replace_pii(text) == expected


@pytest.mark.parametrize("seed", range(3))
def test_the_stream_guard_equals_whole_text_masking_on_tables_and_machine_text(seed):
    from neoxko.pii.stream import PIIStream

    records, _ = _generated(11, 140)
    rng = random.Random(seed)
    for record in records:
        text = record["text"]
        guard, emitted, i = PIIStream(), "", 0
        while i < len(text):
            n = rng.randint(1, 9)
            emitted += guard.push(text[i:i + n])
            i += n
            assert replace_pii(text).startswith(emitted), (text, emitted)
        assert emitted + guard.flush() == replace_pii(text), record["kind"]


def test_pii_generate_refuses_bad_counts(tmp_path):
    import argparse

    from neoxko.cli.pii import run_pii_generate
    from neoxko.errors import NeoxkoError

    for lines, share in ((0, 0.45), (10, 1.5)):
        args = argparse.Namespace(seed=0, lines=lines, negative_share=share, output=str(tmp_path / "x.jsonl"))
        with pytest.raises(NeoxkoError, match="--lines must be at least 1 and --negative-share between 0 and 1"):
            run_pii_generate(args)


@pytest.mark.parametrize("text, opened", [
    ("to=01012345678", "to 01012345678"),
    ("TEL=02-123-4567 fax=02-123-4568", "TEL 02-123-4567 fax 02-123-4568"),
    ("bank_account=110123456789", "bank_account 110123456789"),
    ("level=info value=9504171204456", "level info value 9504171204456"),  # any key of a log line
    ("/a?id=0212345678&no=1", "/a?id=0212345678&no=1"),  # not a URL's query: its ids are not PII
    ("photo=1 2to=3", "photo 1 2to 3"),  # a digit is not part of a PII key
    ("휴대폰연락처=01012345678", "휴대폰연락처 01012345678"),  # a Hangul key ends its word
    ("연락처2=1 ==to== =", "연락처2=1 ==to = ="),
])
def test_key_value_keys_open_pii_keys_and_log_keys(text, opened):
    from neoxko.pii.context import open_keys
    assert open_keys(text) == opened


@pytest.mark.parametrize("line", [
    'a,b,c', '권혁진,"286,650원",110111-8591992', '"a ""quoted"", b",2,3', '"",x,"y,z"', 'one,"two, three, four"',
])
def test_csv_rows_split_as_the_csv_module_reads_them(line):
    import csv

    from neoxko.pii.context import cells as split_cells
    expected = next(csv.reader([line]))
    cells = [c[1:-1].replace('""', '"') if c.startswith('"') else c for c in split_cells(line, ",")]
    assert cells == expected
