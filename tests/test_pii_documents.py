"""PII leaks of text that is not a sentence: a CSV's header over its rows, rows without a header, numbers written
in other digits or with invisible characters between them, in replace_pii, `neoxko data pii`, the pipeline and
the server's stream guard; and the stream guard's cost, linear in its input."""

import json
import subprocess
import sys
import time

import pytest

from neoxko.pii import PIIStream, replace_pii
from neoxko.pii.documents import TableState, mask_blocks, mask_file, mask_lines, mask_record, mode_for

MEMBERS = "이름,휴대폰,주민등록번호,가입일\n김도윤,01093318260,950417-1204456,2021-03-02\n" \
          "이서연,010-9876-5432,030512-4123456,2022-01-01\n"
MASKED = "이름,휴대폰,주민등록번호,가입일\n김도윤,<|tel|>,<|rrn|>,2021-03-02\n이서연,<|tel|>,<|rrn|>,2022-01-01\n"
# The same mobile number as people and programs write it: other digits, invisible characters between digits
VARIANTS = [
    "010\u200b1234\u200b5678", "010\u200d1234\u200d5678", "010\u00ad1234\u00ad5678", "0\ufeff1012345678",
    "٠١٠-١٢٣٤-٥٦٧٨", "۰۱۰-۱۲۳۴-۵۶۷۸", "𝟎𝟏𝟎-𝟏𝟐𝟑𝟒-𝟓𝟔𝟕𝟖", "０１０－１２３４－５６７８", "०१०-१२३४-५६७८",
    "010 \u2013 1234 \u2013 5678", "010\u20601234\u20605678",
]


def _neoxko(*args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "neoxko", *args], input=stdin.encode(), capture_output=True)


def test_an_unheaded_csv_row_is_masked_whole():
    assert replace_pii("김도윤,01093318260,950417-1204456,2021-03-02") == "김도윤,<|tel|>,<|rrn|>,2021-03-02"
    assert replace_pii("01093318260,950417-1204456") == "<|tel|>,<|rrn|>"
    assert replace_pii("가격 1,234,567원, 2021-03-02") == "가격 1,234,567원, 2021-03-02"


@pytest.mark.parametrize("number", VARIANTS)
def test_other_digits_and_invisible_characters_are_the_same_number(number):
    text = f"연락처 {number} 입니다"
    assert replace_pii(text) == "연락처 <|tel|> 입니다", number
    assert replace_pii(f"회원 {number}") == "회원 <|tel|>"  # a mobile number needs no cue


def test_spans_cover_the_invisible_characters_inside_and_not_around():
    from neoxko.pii import find_pii

    text = "\u200b번호 010\u200b1234\u200b5678\u200b입니다"
    (span,) = find_pii(text)
    assert text[span.start:span.end] == "010\u200b1234\u200b5678"


def test_a_csv_header_governs_its_rows_in_every_document_mode():
    lines = MEMBERS.splitlines(keepends=True)
    for mask in (mask_file, mask_lines, mask_blocks):
        assert "".join(text for text, _ in mask(lines)) == MASKED, mask.__name__
    # An account column needs its header: a number of 12 digits is an account only where it is named one
    bank = ["은행,계좌번호,예금주\n", "국민,123412341234,김도윤\n"]
    assert "".join(t for t, _ in mask_lines(bank)) == "은행,계좌번호,예금주\n국민,<|acc|>,김도윤\n"
    semicolons = ["은행;계좌번호;예금주\n", "국민;123412341234;김도윤\n"]  # (a spreadsheet saved with ;)
    assert "".join(t for t, _ in mask_file(semicolons)) == "은행;계좌번호;예금주\n국민;<|acc|>;김도윤\n"


def test_two_header_rows_govern_together():
    """A spreadsheet's group row above its column names: both are the header, in a file and line by line."""
    rows = ["구분\t주문정보\t\t고객\n", "번호\t주문번호\t상품코드\t연락처\n",
            "1\t240305-1188204\t8801111222330\t010-1234-5678\n"]
    expected = "".join(rows[:2]) + "1\t240305-1188204\t8801111222330\t<|tel|>\n"
    for mask in (mask_file, mask_lines):
        assert "".join(t for t, _ in mask(rows)) == expected, mask.__name__


def test_a_header_is_carried_into_later_pieces_of_a_long_file(monkeypatch):
    import neoxko.pii.documents as documents

    monkeypatch.setattr(documents, "PIECE", 40)
    rows = ["순번\t성명\t대표번호\n"] + [f"{i}\t홍길동\t1588-{1000 + i}\n" for i in range(30)]
    out = "".join(text for text, _ in documents.mask_file(rows))
    assert out.count("<|tel|>") == 30 and "1588" not in out
    # without the header, a 1588- number is a year range or an ISSN as much as a phone
    assert replace_pii("3\t홍길동\t1588-1003") == "3\t홍길동\t1588-1003"


def test_table_state_follows_markdown_and_ends_with_the_table():
    state = TableState()
    assert state.context("| 이름 | 연락처 |\n") == ""
    assert state.context("|---|---|\n") == ""  # (kept with the header)
    assert state.context("| 김 | 1588-1234 |\n") == "| 이름 | 연락처 |\n|---|---|"
    assert state.context("표 밖의 문장 1588-1234\n") == ""
    assert state.context("| 김 | 1588-1234 |\n") == ""


def test_a_blank_line_block_is_one_document():
    letter = ["마음 전하실 곳\n", "신랑 김도윤\n", "국민은행\n", "123456-78-901234\n", "\n", "오시는 길 2021-03-02\n"]
    assert "".join(t for t, _ in mask_blocks(letter)) == \
        "마음 전하실 곳\n신랑 김도윤\n국민은행\n<|acc|>\n\n오시는 길 2021-03-02\n"


def test_a_json_record_is_one_document_its_keys_and_siblings_the_cues():
    record = {"name": "김도윤", "phone": "01093318260", "refund": {"bank": "신한", "number": "110123456789"},
              "rrn": 9504171204456, "joined": "2021-03-02", "vip": True, "orders": [{"id": "230629-3488523"}]}
    masked, counts = mask_record(record)
    assert masked == {"name": "김도윤", "phone": "<|tel|>", "refund": {"bank": "신한", "number": "<|acc|>"},
                      "rrn": "<|rrn|>", "joined": "2021-03-02", "vip": True, "orders": [{"id": "230629-3488523"}]}
    assert counts == {"tel": 1, "acc": 1, "rrn": 1}


def test_document_mode_by_name_and_content():
    assert mode_for("members.CSV", "") == "file" and mode_for("x.md", "") == "file"
    assert mode_for("x.jsonl", "") == "jsonl" and mode_for("x.txt", "a\n\nb") == "blocks"
    assert mode_for("x.json", '[\n {"a": 1}\n]') == "json" and mode_for("x.json", '{"a": 1}\n{"b": 2}') == "jsonl"
    assert mode_for("-", "a\nb\n") == "lines"


def test_the_command_masks_a_members_csv_and_a_json_export(tmp_path):
    (tmp_path / "members.csv").write_text(MEMBERS, encoding="utf-8")
    out = _neoxko("data", "pii", str(tmp_path / "members.csv"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == MASKED and "rrn 2, tel 2, acc 0 (documents: file)" in out.stderr.decode()
    # the same rows through stdin, a document a line: the header still governs its rows
    out = _neoxko("data", "pii", "--documents", "lines", stdin=MEMBERS)
    assert out.stdout.decode() == MASKED
    zw = "문의 " + "\u200b".join("01012345678") + "\n"
    assert _neoxko("data", "pii", stdin=zw).stdout.decode() == "문의 <|tel|>\n"
    (tmp_path / "export.jsonl").write_text(json.dumps({"tel": "010\u200b9876\u200b5432", "n": 3}) + "\n")
    out = _neoxko("data", "pii", str(tmp_path / "export.jsonl"))
    assert json.loads(out.stdout) == {"tel": "<|tel|>", "n": 3}


def test_the_command_names_a_record_that_is_not_json_and_leaves_no_half_file(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": "010-1234-5678"}\nplain text 010-1234-5678\n', encoding="utf-8")
    out = _neoxko("data", "pii", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "y.jsonl"))
    assert out.returncode == 2 and b"x.jsonl:2: not a JSON record (Expecting value); use --documents lines" in out.stderr
    assert b"Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]  # no y.jsonl, no partial file left
    out = _neoxko("data", "pii", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "no" / "such" / "y.jsonl"))
    assert out.returncode == 2 and b"cannot write" in out.stderr and b"No such file or directory" in out.stderr


def test_the_command_writes_in_place_gzip_and_other_encodings(tmp_path):
    import gzip

    path = tmp_path / "members.csv"
    path.write_text(MEMBERS, encoding="utf-8")
    out = _neoxko("data", "pii", str(path), "--output", str(path))  # the same file: replaced when done
    assert out.returncode == 0 and path.read_text(encoding="utf-8") == MASKED
    with gzip.open(tmp_path / "m.csv.gz", "wt", encoding="utf-8") as f:
        f.write(MEMBERS)
    out = _neoxko("data", "pii", str(tmp_path / "m.csv.gz"), "--output", str(tmp_path / "o.csv.gz"))
    assert out.returncode == 0 and gzip.open(tmp_path / "o.csv.gz", "rt", encoding="utf-8").read() == MASKED
    # cp949, as older Korean Windows programs write: read as UTF-8 its words are not cues; --encoding reads them
    (tmp_path / "bank.csv").write_bytes("은행,계좌번호\n국민,123412341234\n".encode("cp949"))
    out = _neoxko("data", "pii", str(tmp_path / "bank.csv"))  # (auto: the first lines are cp949, not UTF-8)
    assert out.stdout.decode() == "은행,계좌번호\n국민,<|acc|>\n" and b"as cp949 (its first lines" in out.stderr
    out = _neoxko("data", "pii", str(tmp_path / "bank.csv"), "--encoding", "utf-8")
    assert b"123412341234" in out.stdout and b"run again with --encoding cp949" in out.stderr
    out = _neoxko("data", "pii", str(tmp_path / "bank.csv"), "--encoding", "korean-ish")
    assert out.returncode == 2 and b"unknown --encoding 'korean-ish'; for Korean files try cp949" in out.stderr


def test_a_whole_json_file_is_one_document(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"bank": "국민", "no": "123456-78-901234"},\n  {"n": 1}\n]\n')
    out = _neoxko("data", "pii", str(tmp_path / "a.json"))
    assert json.loads(out.stdout) == [{"bank": "국민", "no": "<|acc|>"}, {"n": 1}]
    assert b"(documents: json)" in out.stderr
    (tmp_path / "b.json").write_text('[1,\n')
    out = _neoxko("data", "pii", str(tmp_path / "b.json"))
    assert out.returncode == 2 and b"b.json:2:1: not JSON (Expecting value); use --documents jsonl" in out.stderr


def test_a_json_record_without_pii_is_written_back_as_it_was(tmp_path):
    lines = '{"a":0.50,"b":1e3,"name":"\\uae40"}\n{"tel": "010-1234-5678"}\n'
    (tmp_path / "x.jsonl").write_text(lines, encoding="utf-8")
    out = _neoxko("data", "pii", str(tmp_path / "x.jsonl"))
    assert out.stdout.decode().splitlines() == ['{"a":0.50,"b":1e3,"name":"\\uae40"}', '{"tel": "<|tel|>"}']


def test_shapes_a_stranger_found():
    """Leaks and over-masking a helper found feeding the command files it wrote from POLICY.md."""
    assert replace_pii("관람료 1500-1800원, 예매 1577-8092") == "관람료 1500-1800원, 예매 <|tel|>"
    assert replace_pii('<a href="https://wa.me/+821093184853">') == '<a href="https://wa.me/<|tel|>">'
    assert replace_pii("rrn=450212-2229963 corp=110111-1874026") == "rrn=<|rrn|> corp=110111-1874026"
    assert replace_pii("corp_reg_no,name\n130111-7875339,가람\n") == "corp_reg_no,name\n130111-7875339,가람\n"
    # a second stranger's files
    assert replace_pii("주민번호(세금계산서용 개인사업자): 660314-1021538") == "주민번호(세금계산서용 개인사업자): <|rrn|>"
    assert replace_pii("발신 15885762 : [Web발신] 결제 완료") == "발신 <|tel|> : [Web발신] 결제 완료"
    assert replace_pii('CS_CENTER = "1899-4012"') == 'CS_CENTER = "<|tel|>"'
    assert replace_pii("미입금자 010-2896-2270 님") == "미입금자 <|tel|> 님"  # (a depositor is no account)
    assert replace_pii("택배사: 02-3307-1122, 카드 분실신고 1588-1234") == "택배사: <|tel|>, 카드 분실신고 <|tel|>"
    assert replace_pii("유한회사 (등록번호 180111-5901326)") == "유한회사 (등록번호 180111-5901326)"
    assert replace_pii('backup_date="1709121530000"') == 'backup_date="1709121530000"'
    assert replace_pii("승인 16422062") == "승인 16422062"


def test_the_pipeline_reads_a_csv_as_one_document_and_txt_rows_after_their_header(tmp_path):
    from neoxko.data.steps import CleanKorean, KoreanTextReader, ReplacePII

    (tmp_path / "members.csv").write_text(MEMBERS, encoding="utf-8")
    (tmp_path / "members.txt").write_text("순번\t성명\t대표번호\n1\t홍길동\t1588-1234\n", encoding="utf-8")
    (tmp_path / "zw.txt").write_text("문의 010\u200b1234\u200b5678 또는 ٠١٠-١٢٣٤-٥٦٧٨\n", encoding="utf-8")
    (tmp_path / "files.txt").write_text("members.csv\nmembers.txt\nzw.txt\n", encoding="utf-8")
    reader = KoreanTextReader(str(tmp_path), paths_file=str(tmp_path / "files.txt"))
    docs = list(ReplacePII().run(CleanKorean().run(reader.run())))
    texts = [d.text for d in docs]
    assert texts == [MASKED.rstrip("\n"), "순번\t성명\t대표번호", "1\t홍길동\t<|tel|>", "문의 <|tel|> 또는 <|tel|>"]
    assert all("pii_context" not in d.metadata for d in docs)


def test_the_stream_guard_holds_back_other_digits_and_invisible_characters():
    for number in VARIANTS:
        text = f"연락처 {number} 입니다"
        guard, parts = PIIStream(), []
        for char in text:
            parts.append(guard.push(char))
        parts.append(guard.flush())
        assert "".join(parts) == "연락처 <|tel|> 입니다", number
        assert not any(char.isdecimal() for part in parts for char in part), number


def _stream_seconds(text: str, piece: int) -> float:
    start = time.perf_counter()
    guard = PIIStream()
    for at in range(0, len(text), piece):
        guard.push(text[at:at + piece])
    guard.flush()
    return time.perf_counter() - start


@pytest.mark.parametrize("alphabet", ["   ", "0123456789", "0 1-2.3 4(5)6+7 8 9 ", "01 ()-. \u200b٣"])
def test_the_stream_guard_is_linear_in_its_input(alphabet):
    """1 MB of separators, spaces and digits against 10 KB: a quadratic guard would take 10,000 times as long
    (it took 55 s on 20 KB of spaces); a linear one 100 times. The bound leaves room for a busy machine."""
    import random

    rng = random.Random(0)
    big = "".join(rng.choice(alphabet) for _ in range(1_000_000))
    small = big[:10_000]
    for piece in (64, 4096):
        small_s = min(_stream_seconds(small, piece) for _ in range(3))
        big_s = _stream_seconds(big, piece)
        assert big_s < 400 * max(small_s, 1e-3), (alphabet, piece, small_s, big_s)


# -- recall on the shapes only PII has (POLICY.md, docs/pii-policy.md): wherever they stand, however written --
_SEPARATORS = ["", "-", "-", ".", " ", " - ", "\u2013", "\u3161", "\uff0d", "\u00b7", "\u200b", "  "]
_FILLER = ["오늘", "확인", "부탁드립니다", "감사합니다", "메모", "김도윤", "참고", "비고", "a", "note", "값"]
_DIGIT_SETS = ["0123456789"] * 8 + ["０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩"]


def _unmistakable(rng) -> tuple[str, str]:
    """A number whose shape only PII has: a mobile number, an RRN with a real birth date and 7th digit, or a
    landline with its area code, in a random written form."""
    import datetime

    kind = rng.choice(["mobile", "legacy", "rrn", "landline"])
    sep = rng.choice(_SEPARATORS)
    d = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    if kind == "mobile":
        number = f"010{sep}{rng.randint(2, 9)}{d(3)}{sep}{d(4)}"
    elif kind == "legacy":
        number = f"01{rng.choice('16789')}{sep}{rng.randint(2, 9)}{d(rng.choice([2, 3]))}{sep}{d(4)}"
    elif kind == "rrn":
        born = datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(0, 365 * 94))
        s = (1 if born.year < 2000 else 3) + rng.randrange(2) + rng.choice([0, 0, 0, 4])
        number = born.strftime("%y%m%d") + rng.choice(["-", "", " ", "\u2013", "\uff0d"]) + str(s) + d(6)
    else:
        sep = sep or "-"  # (a contiguous landline is a customer number as often as a phone: not unmistakable)
        area = rng.choice(["02", "031", "032", "051", "053", "062", "064", "070", "0505"])
        number = f"{area}{sep}{rng.randint(2, 9)}{d(rng.choice([2, 3]))}{sep}{d(4)}"
    digits = rng.choice(_DIGIT_SETS)
    return kind, number.translate(str.maketrans("0123456789", digits))


def _document(rng, number: str) -> tuple[str, str]:
    """The number in a document of a random kind, with neutral words around it (no cue, no veto)."""
    f = lambda: rng.choice(_FILLER)  # noqa: E731
    kind = rng.choice(["prose", "csv", "tsv", "markdown", "json", "html", "chat", "log", "block"])
    if kind == "prose":
        return kind, f"{f()} {f()} {number}{rng.choice(['', '로', '입니다', ' ', '.', ')'])} {f()}"
    if kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        row = sep.join([f(), number, "2021-03-02", f()])
        return kind, row if rng.random() < 0.5 else sep.join(["a", "b", "c", "d"]) + "\n" + row
    if kind == "markdown":
        return kind, f"| {f()} | 값 |\n|---|---|\n| {f()} | {number} |"
    if kind == "json":
        return kind, json.dumps({"k": f(), "v": number, "n": 3}, ensure_ascii=False)
    if kind == "html":
        return kind, f"<tr><td>{f()}</td><td>{number}</td></tr>"
    if kind == "chat":
        return kind, f"[{f()}] [오후 3:12] {f()} {number} {f()}"
    if kind == "log":
        return kind, f"2024-05-01T10:00:00Z INFO {f()} value={number} took=12ms"
    return kind, f"{f()}\n{number}\n{f()}"


def test_unmistakable_shapes_are_masked_in_every_document_kind():
    import random
    from collections import Counter

    from neoxko.pii import find_pii

    rng = random.Random(26)
    seen, missed = Counter(), Counter()
    examples = []
    for _ in range(4000):
        shape, number = _unmistakable(rng)
        kind, text = _document(rng, number)
        at = text.index(number)
        found = any(s.start <= at and s.end >= at + len(number.rstrip()) for s in find_pii(text))
        seen[shape, kind] += 1
        if not found:
            missed[shape, kind] += 1
            examples.append(text)
    recall = 1 - sum(missed.values()) / sum(seen.values())
    assert recall >= 0.995, (recall, missed, examples[:10])
    for key, n in seen.items():
        assert missed[key] / n <= 0.02, (key, missed[key], n, examples[:10])


def test_the_builtin_sets_are_well_formed_and_meet_the_targets():
    """The sets `neoxko data pii-eval` reports: strict P and R >= 0.98 per label on both generators' report
    seeds (the rules were tuned on seed 1), no-PII lines untouched; on the real text's 41 phone numbers 0.92-0.93
    (docs/pii-policy.md says what is left)."""
    from neoxko.pii.score import DATA, builtin_sets, read_labelled, score

    for half in ("tune", "heldout"):
        for text, spans in read_labelled(DATA / f"real_text_{half}.jsonl"):
            for s in spans:
                assert text[s.start].isdigit() or text[s.start] in "+(", (text, s)
                assert text[s.end - 1].isdigit() and not (s.end < len(text) and text[s.end].isdigit()), (text, s)
    sets = builtin_sets(1500)
    for name, (items, _) in sets.items():
        r = score(items)
        assert r.negative_changed <= 0.005 * r.negative_lines, (name, r.table())
        for label in ("rrn", "tel", "acc"):
            if name.startswith(("genres", "synth")) or label != "tel":
                assert r.strict[label].precision >= 0.98 and r.strict[label].recall >= 0.98, (name, label, r.table())
            else:  # (12 and 29 phone numbers: one doubled area code, 02 02-781-9672, is a boundary error in tune)
                assert r.strict[label].precision >= 0.9 and r.strict[label].recall >= 0.9, (name, label, r.table())


def test_a_big_table_costs_in_proportion_to_its_rows():
    """A 20,000-row member list once took 31 s where 2,500 rows took 1.6 s (overlapping candidates were resolved
    pairwise, and each window searched the whole text for a bracket): 40 times the rows must cost about 40 times
    the time (the old code: over 300 times)."""
    import random

    from neoxko.pii import find_pii

    rng = random.Random(0)
    d = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    rows = [f"M{i:08d},김도윤,010-{rng.randint(2, 9)}{d(3)}-{d(4)},{rng.randint(70, 99)}0{rng.randint(1, 9)}"
            f"1{rng.randint(0, 9)}-{rng.randint(1, 2)}{d(6)},user{i}@example.com,2021-01-25,{d(5)},07{d(8)},카뱅,"
            f"3333-{d(2)}-{d(7)},{d(7)}" for i in range(20_000)]
    header = "회원번호,이름,휴대폰,주민등록번호,이메일,가입일,우편번호,고객번호,은행,계좌번호,누적구매액\n"
    small, big = header + "\n".join(rows[:500]), header + "\n".join(rows)
    start = time.perf_counter()
    assert len(find_pii(small)) == 1500
    small_s = time.perf_counter() - start
    start = time.perf_counter()
    assert len(find_pii(big)) == 3 * len(rows)
    big_s = time.perf_counter() - start
    assert big_s < 120 * max(small_s, 1e-3), (small_s, big_s)
