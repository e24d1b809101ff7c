"""A seeded generator of labelled Korean PII lines, written from FORMATS.md and POLICY.md (not from any
labelled set's lines), with labels by construction.

Every value format (RRNs and foreigner numbers, valid and post-2020 random tails, every separator and
full-width digits; mobile, legacy, Seoul, regional, 070, 050X, 080, 15XX/16XX/18XX, +82 forms, bracketed
area codes; every bank layout of FORMATS.md with bank names before, after or glued, digits only, 평생계좌)
goes into every context kind: prose, chat, SMS, ads, notices, CSV/TSV/Markdown/aligned tables, forms,
logs, key=value and JSON records, legal text. At least 40% of the lines carry only hard negatives:
dates, prices, business and corporate registration numbers, order, tracking and approval numbers,
ISBN/ISSN, year ranges, EAN-13 and drug codes that form a valid birth date, masked values, timestamps,
customer numbers, short codes.

    neoxko data pii-generate --seed 2 --lines 3000 --output held_out.jsonl
"""

import json
import random
from pathlib import Path

from neoxko.pii.values import account, business_number, negative, phone, random_digits, rrn, rrn_surface

KINDS = ("prose", "chat", "sms", "ad", "notice", "csv", "tsv", "markdown", "aligned", "form", "log", "keyvalue",
         "json", "legal")
NAMES = ["김민수", "이서연", "박지훈", "최유나", "정하늘", "강태오", "조은비", "윤서준", "장미란", "임도현", "한지우",
         "오세라", "서경호", "신다은", "권혁진", "황보람"]


class Line:
    """Text built piece by piece, with the spans of the labelled pieces."""

    def __init__(self, kind: str):
        self.kind, self.text, self.spans = kind, "", []

    def add(self, text: str) -> "Line":
        self.text += text
        return self

    def pii(self, value: str, label: str | None) -> "Line":
        if label is not None:
            self.spans.append({"start": len(self.text), "end": len(self.text) + len(value), "label": label})
        self.text += value
        return self

    def record(self) -> dict:
        return {"text": self.text, "spans": self.spans, "kind": self.kind}


# -- contexts -------------------------------------------------------------------------------------
PHONE_CUES = ["연락처", "전화", "휴대폰", "핸드폰", "HP", "Tel.", "☎", "문의", "상담", "대표번호", "고객센터", "직통", "안심번호",
              "문자", "카톡"]
SERVICE_WORDS = ["문의", "예약", "예약 변경/취소", "견적 문의", "상담", "고객센터", "예약 문의"]
SHORT_LABELS = ["사무실", "회사", "T.", "F.", "Fax", "Tel", "T)"]
ACC_CUES = ["계좌", "입금", "입금계좌", "송금", "이체", "환불 계좌", "회비", "축의금", "후원 계좌", "보내실 곳", "가상계좌", "모임통장"]
RRN_CUES = ["주민등록번호", "주민번호", "외국인등록번호"]


def _value(r: random.Random, label: str, table: bool = False) -> tuple[str, str, str]:
    """(value, label for the span, a cue word) of a PII value."""
    if label == "rrn":
        foreign = r.random() < 0.2
        return rrn_surface(r, rrn(r, foreign), table), "rrn", "외국인등록번호" if foreign else r.choice(RRN_CUES[:2])
    if label == "tel":
        kind = r.choice(["any"] * 6 + ["representative", "landline"])
        if kind == "representative":
            return phone(r, "representative")[0], "tell", r.choice(SERVICE_WORDS)
        if kind == "landline":
            return phone(r, "landline")[0], "tell", r.choice(SHORT_LABELS)
        return phone(r)[0], "tell", r.choice(PHONE_CUES)
    bank, number = account(r)
    return number, "acc", bank


def make_line(r: random.Random, kind: str, positive: bool) -> Line:
    line = Line(kind)
    name = r.choice(NAMES)
    labels = [r.choice(["rrn", "tel", "acc"]) for _ in range(r.choice([1, 1, 2]))] if positive else []
    return BUILDERS[kind](r, line, name, labels)


def _prose(r, line, name, labels):
    if not labels:
        cue, value = negative(r)
        return line.add(r.choice([f"{name} 님의 {cue}는 {value} 입니다. ", f"참고로 {cue} {value} 확인 바랍니다. ",
                                  f"{cue}: {value}, 담당 {name}. "]))
    for i, label in enumerate(labels):
        value, span, cue = _value(r, label)
        if span == "acc":
            form = r.random()
            if form < 0.3:
                line.add(f"{r.choice(ACC_CUES)}는 {cue} ").pii(value, span).add(f" {name}으로 부탁드려요. ")
            elif form < 0.5:
                line.add(f"{r.choice(ACC_CUES)}: ").pii(value, span).add(f" {cue} {name} ")
            elif form < 0.65:
                line.add(f"{cue}").pii(value, span).add(f"{name} 으로 입금해 주세요. ")
            elif form < 0.8 and cue in ("기업은행", "IBK기업은행"):
                mobile = phone(r, "mobile")[0]
                line.add(f"{cue} 평생계좌 ").pii(mobile, "acc").add(" 로 보내 주세요. ")
            else:
                line.add(f"{cue} ").pii(value, span).add(f" ({name}) 로 송금 바랍니다. ")
        elif span == "tell":
            line.add(f"{cue} ").pii(value, span).add(r.choice(["로 연락 주세요. ", " 으로 문의 바랍니다. ", " 입니다. "]))
        else:
            line.add(f"{name} 님 {cue} ").pii(value, span).add(" 확인했습니다. ")
        if i == 0 and r.random() < 0.4:
            neg_cue, neg = negative(r)
            line.add(f"({neg_cue} {neg}) ")
    return line


def _chat(r, line, name, labels):
    line.add(r.choice(["[오후 3:12] ", "ㅇㅇ ", "나: ", f"{name}: "]))
    if not labels:
        cue, value = negative(r)
        return line.add(f"아 그거 {cue} {value} 맞아? ㅋㅋ")
    for label in labels:
        value, span, cue = _value(r, label)
        if span == "acc":
            line.add(f"{cue} ").pii(value, span).add(r.choice([" 여기로 보내줘", " 로 쏴줘~", " 입금 ㄱㄱ "]))
        elif span == "tell":
            line.add(f"내 {r.choice(['번호', '폰번', '연락처', '핸드폰'])} ").pii(value, span).add(" 저장해 ")
        else:
            line.add(f"{r.choice(['주민번호', '주민등록번호'])} ").pii(value, span).add(" 이거 맞지? ")
    return line


def _sms(r, line, name, labels):
    line.add("[Web발신] ")
    if not labels:
        cue, value = negative(r)
        return line.add(f"{name}님 {cue} {value} 처리되었습니다. 문의 1588-{random_digits(r, 4)}".replace("문의 1588", "국번없이 112")
                        if r.random() < 0.3 else f"{name}님 {cue} {value} 안내드립니다.")
    for label in labels:
        value, span, cue = _value(r, label)
        if span == "tell":
            line.add(f"{name}님 {cue} ").pii(value, span).add(" ")
        elif span == "acc":
            line.add(f"입금계좌 {cue} ").pii(value, span).add(f" 예금주 {name} ")
        else:
            line.add(f"본인확인 {cue} ").pii(value, span).add(" ")
    if labels and r.random() < 0.5:  # a phone with its own cue after an account
        value, _ = phone(r, "mobile")
        line.add(f"{r.choice(['문자', '전화'])} ").pii(value, "tell").add(" 로 주세요")
    return line


def _ad(r, line, name, labels):
    line.add(r.choice(["★오픈 이벤트★ ", "[광고] ", "■ 할인 행사 ■ "]))
    if not labels:
        cue, value = negative(r)
        return line.add(f"전 품목 30% {cue} {value} 선착순!")
    for label in labels:
        value, span, cue = _value(r, label)
        if span == "tell":
            line.add(f"{cue} ").pii(value, span).add(" ")
        elif span == "acc":
            line.add(f"무통장입금 {cue} ").pii(value, span).add(" ")
        else:
            line.add(f"회원가입 {cue} ").pii(value, span).add(" ")
    return line


def _notice(r, line, name, labels):
    line.add("[공지] ")
    if not labels:
        cue, value = negative(r)
        return line.add(f"{cue} {value} 관련 안내입니다. 자세한 사항은 홈페이지 참고.")
    for label in labels:
        value, span, cue = _value(r, label)
        line.add(f"{'납부 ' + r.choice(ACC_CUES) + ' ' + cue if span == 'acc' else cue}: ").pii(value, span).add(" / ")
    return line


def _table(sep: str, r, line, name, labels, markdown=False, aligned=False):
    columns = ["이름"]
    cells = []
    negatives = [] if labels else [negative(r) for _ in range(r.choice([1, 2]))]
    for label in labels:
        value, span, cue = _value(r, label, table=True)
        header = {"rrn": cue, "acc": r.choice(["계좌번호", "입금계좌", "계좌"]),
                  "tel": r.choice(["연락처", "휴대폰", "전화번호", "HP", "Tel"])}[label]
        columns.append(header)
        cells.append((value, span, cue if label == "acc" else None))
    for cue, value in negatives:
        columns.append(cue)
        cells.append((value, None, None))
    if any(c[2] for c in cells):
        columns.append("은행")
    rows = []
    first_bank = next((c[2] for c in cells if c[2]), None)
    for _ in range(r.choice([1, 2, 3])):
        row, row_bank = [(r.choice(NAMES), None)], first_bank
        for i, (value, span, _) in enumerate(cells):
            if rows:  # a fresh value of the same kind in each row
                label = {"rrn": "rrn", "tell": "tel", "acc": "acc"}.get(span)
                value = _value(r, label, table=True)[0] if label else _regenerate_negative(r, columns[i + 1], value)
                if span == "acc":
                    row_bank, value = account(r)
            row.append((value, span))
        if first_bank:
            row.append((row_bank, None))
        rows.append(row)
    width = 16

    def cell(text):
        return text.ljust(width) if aligned else text

    if markdown:
        line.add("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    else:
        line.add(sep.join(cell(c) for c in columns) + "\n")
    for row in rows:
        line.add("| " if markdown else "")
        for i, (value, span) in enumerate(row):
            quoted = sep == "," and "," in value  # (as CSV writers do: "1,234,000원")
            line.add('"' if quoted else "").pii(value, span).add('"' if quoted else "")
            if aligned:
                line.add(" " * max(2, width - len(value)))
            elif i < len(row) - 1:
                line.add(" | " if markdown else sep)
        line.add(" |\n" if markdown else "\n")
    return line


def _regenerate_negative(r, cue: str, old: str) -> str:
    for _ in range(50):
        c, value = negative(r)
        if c == cue:
            return value
    return old


def _form(r, line, name, labels):
    sep = r.choice([": ", " : ", "：", "\t"])
    line.add(f"성명{sep}{name}\n")
    if not labels:
        for _ in range(2):
            cue, value = negative(r)
            line.add(f"{cue}{sep}{value}\n")
        return line
    for label in labels:
        value, span, cue = _value(r, label, table=True)
        field = {"rrn": cue, "tel": r.choice(["연락처", "휴대폰", "자택 전화", "비상연락처"]),
                 "acc": r.choice(["환급계좌", "입금계좌", "급여계좌"])}[label]
        if span == "acc":
            line.add(f"{field}{sep}{cue} ").pii(value, span).add("\n")
        else:
            line.add(f"{field}{sep}").pii(value, span).add("\n")
        if r.random() < 0.4:
            cue, neg = negative(r)
            line.add(f"{cue}{sep}{neg}\n")
    return line


def _log(r, line, name, labels):
    stamp = f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:" \
            f"{r.randint(0, 59):02d}"
    line.add(f"{stamp} INFO ")
    if not labels:
        return line.add(f"req_id={random_digits(r, 12)} order={random_digits(r, 14)} amount={r.randint(1000, 99999)} "
                        f"ts={random_digits(r, 13)} status=200")
    for label in labels:
        if label == "tel":
            value = phone(r, "mobile")[0].replace("-", "").replace(" ", "") if r.random() < 0.6 else phone(r)[0]
            line.add(f"sms.send {r.choice(['to=', 'from=', 'msisdn=', 'phone=', 'caller='])}").pii(value, "tell").add(" ")
        elif label == "acc":
            bank, value = account(r)
            line.add(f"transfer bank={bank} account=").pii(value, "acc").add(" ")
        else:
            line.add("kyc.check rrn=").pii(rrn_surface(r, rrn(r)), "rrn").add(" ")
    return line.add(f"status=200 latency_ms={r.randint(5, 900)}")


def _keyvalue(r, line, name, labels):
    line.add(f"name={name}; ")
    if not labels:
        cue, value = negative(r)
        return line.add(f"order_id={random_digits(r, 10)}; item={random_digits(r, 13)}; note={cue} {value}")
    for label in labels:
        if label == "tel":
            line.add(f"{r.choice(['tel', 'hp', 'mobile', 'phone', '연락처'])}=").pii(phone(r)[0], "tell").add("; ")
        elif label == "acc":
            bank, value = account(r)
            line.add(f"bank={bank}; {r.choice(['account', 'acct_no', '계좌'])}=").pii(value, "acc").add("; ")
        else:
            line.add(f"{r.choice(['rrn', 'jumin', '주민번호'])}=").pii(rrn_surface(r, rrn(r)), "rrn").add("; ")
    return line


def _json(r, line, name, labels):
    line.add('{"name": "' + name + '", ')
    if not labels:
        return line.add(f'"order_no": "{random_digits(r, 12)}", "biz_no": "{business_number(r)}", '
                        f'"created": "{random_digits(r, 14)}", "price": {r.randint(1000, 900000)}}}')
    for label in labels:
        if label == "tel":
            line.add(f'"{r.choice(["tel", "phone", "mobile", "hp", "msisdn"])}": "').pii(phone(r)[0], "tell").add('", ')
        elif label == "acc":
            bank, value = account(r)
            line.add(f'"bank": "{bank}", "{r.choice(["account", "account_no", "refund_account"])}": "') \
                .pii(value, "acc").add('", ')
        else:
            line.add(f'"{r.choice(["rrn", "resident_no", "jumin"])}": "').pii(rrn_surface(r, rrn(r)), "rrn").add('", ')
    return line.add(f'"updated": "2024-0{r.randint(1, 9)}-1{r.randint(0, 9)}"}}')


def _legal(r, line, name, labels):
    line.add(f"원고 {name}, 피고 주식회사 한빛 (법률 제{r.randint(10000, 19999)}호 제{r.randint(1, 99)}조의{r.randint(2, 5)} 참조). ")
    if not labels:
        return line.add(f"{r.randint(2000, 2024)}다{r.randint(1000, 99999)} 판결, 법인등록번호 110111-{random_digits(r, 7)}.")
    for label in labels:
        value, span, cue = _value(r, label)
        if span == "acc":
            line.add(f"원고는 피고에게 {cue} {r.choice(['계좌', '예금계좌'])} ").pii(value, span).add("로 금원을 지급하였다. ")
        elif span == "rrn":
            line.add(f"원고({cue} ").pii(value, span).add(") ")
        else:
            line.add(f"피고 {cue} ").pii(value, span).add(" ")
    return line


BUILDERS = {
    "prose": _prose, "chat": _chat, "sms": _sms, "ad": _ad, "notice": _notice,
    "csv": lambda r, line, name, labels: _table(",", r, line, name, labels),
    "tsv": lambda r, line, name, labels: _table("\t", r, line, name, labels),
    "markdown": lambda r, line, name, labels: _table(" | ", r, line, name, labels, markdown=True),
    "aligned": lambda r, line, name, labels: _table("", r, line, name, labels, aligned=True),
    "form": _form, "log": _log, "keyvalue": _keyvalue, "json": _json, "legal": _legal,
}


def generate(seed: int, lines: int, negative_share: float = 0.45) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(lines):
        kind = KINDS[i % len(KINDS)]
        out.append(make_line(r, kind, positive=r.random() >= negative_share).record())
    return out


def write(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
