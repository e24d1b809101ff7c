"""Held-out PII test documents in the genres where Korean numbers get written: tables, JSON, logs, forms, chats.

Written from /work/shared/pii/POLICY.md and FORMATS.md alone, without reading the replacer's rules or the
sentence-style generator, so that it tests the policy and not one implementation of it. A record is a whole
document (lines joined by "\\n"). Gold spans follow POLICY.md: from the first character of the number (a bracket
of the number, `+`, `0082` or `82` included) to its last digit; labels, particles and brackets around the whole
number stay outside; a zero-width character or soft hyphen between digits stays inside. About 40% of documents
carry only hard negatives. All values are random.

Documents are written in a small template language: `{token}` or `{token:arg}` draws a value (TOKENS), and a line
`+pii||plain` shows its PII form in a positive document (at least one such line) and its plain form otherwise.

    python -m neoxko.pii.genres --seed 1 --documents 3000 --output genres.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

NEGATIVE_SHARE = 0.4
REFORM = datetime.date(2020, 10, 5)  # RRNs given from this day on have a random tail and no check digit
RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
BIZ_WEIGHTS = (1, 3, 7, 1, 3, 7, 1, 3, 5)
AREAS = "031 032 033 041 042 043 044 051 052 053 054 055 061 062 063 064".split()
REPRESENTATIVE = "1588 1577 1544 1566 1599 1600 1644 1661 1670 1688 1800 1833 1855 1899".split()
PHONE_KINDS = {"mobile": 30, "legacy": 7, "seoul": 10, "area": 12, "voip": 7, "safe": 6, "free": 5, "premium": 2,
               "rep": 10}
PHONE_SEPS = ("-",) * 8 + (".", ".", " ", " ", "", "", "–", "ㅡ", " - ")
RRN_SEPS = ("-",) * 6 + ("", " ", " - ", "–", ".")
COUNTRY_CODES = ("+82-", "+82 ", "+82 (0)", "0082-", "82-", "+82")
SHORT_CODES = ("112", "119", "114", "120", "1330", "1339", "1345", "182", "1366", "129")
# bank names (short forms after the first) and layouts: groups joined by "-", "[a/b]" is a fixed prefix
BANKS = (
    ("국민은행 국민 KB국민 KB 국민銀", "4+[01/02/04/24/25/26]-2-6 3-2-4-3 4-[92]-7-1"),
    ("신한은행 신한 신한銀", "[110/100/120/140/160]-3-6 3-2-6 [560/561/562]-5-6"),
    ("우리은행 우리", "[1002/1005/1006]-3-6 3-2-6"), ("하나은행 하나 KEB하나", "3-6-5 [611/620/630]-6-3"),
    ("NH농협은행 농협 NH농협 NH", "[301/302/312/317]-4-4-2 6-[51/52/56]-6"),
    ("지역농협 단위농협", "[351/352/356]-4-4-2"), ("SC제일은행 SC제일", "3-[10/20/30]-6"),
    ("IBK기업은행 기업은행 기업 IBK", "3-6-[01/02/03/04/06/07/13]-3 3-2-6-1"),
    ("카카오뱅크 카뱅 카카오", "[3333/3355/3388/7777/7979]-2-7"), ("토스뱅크 토스", "[1000/1001/1002/1908]-4-4"),
    ("케이뱅크 K뱅크", "[100]-3-6 3-3-7"), ("우체국", "6-[01/02/03/97]-6 3-8-1"),
    ("새마을금고 MG새마을금고", "[9002/9003/9005]-2-7 [9002/9003/9005]-4-4-1"),
    ("수협은행 수협 Sh수협", "[101]+1-4-4 3-9"), ("부산은행 부산 BNK부산", "[101/102/112/113]-4-4-2 3-2-6-1"),
    ("iM뱅크 대구은행 DGB", "[501/502/504/505/508]-2-6-1"), ("경남은행 경남 BNK경남", "[207/209/221/222]-9-1"),
    ("광주은행 광주", "3-3-6 1-3-8-1"), ("신협", "[131/132/134]-3-6"), ("KDB산업은행 산업은행 KDB", "3-8-3"),
    ("제주은행 제주", "[700/702/710/720/750/771]-6-3"), ("전북은행 전북", "1-3-2-6-1"), ("씨티은행 씨티", "3-5-3-2"),
)
SURNAMES = "김이박최정강조윤장임한오서신권황안송홍유고문양손배백허남심노하곽성차주우구"
SYLLABLES = "민서준지현우도윤하은수아예진호연채영성재희태경정유나빈원승혜동소주시"
SHOPS = "행복마트 한빛문구 바다횟집 동네세탁소 미소치과 새봄약국 우리정육점 하늘꽃집 별빛카페 든든분식".split()
COMPANIES = "한빛솔루션 누리테크 다온물산 새솔건설 가람식품 온새미로 바른회계법인 미래로통상".split()
ORGS = "서울특별시 강남구,부산광역시 해운대구,경기도 수원시,대구광역시 수성구,전라남도 순천시".split(",")
ROADS = "테헤란로 세종대로 해운대로 중앙로 경수대로 달구벌대로 충장로".split()
INVISIBLE = ("\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad")
DIGIT_BASES = {"fullwidth": 0xFF10, "arabic": 0x0660, "bold": 0x1D7CE}
DISGUISES = ("fullwidth", "arabic", "bold", "invisible", "fullwidth+invisible", "arabic+invisible")


@dataclass(frozen=True)
class Pii:
    text: str
    label: str
    quoted: bool = True  # JSON only: False writes the number bare, like "msisdn": 821012345678


@dataclass
class Doc:
    """A document under construction: text pieces and the gold spans of the Pii pieces."""

    disguise: Callable[[str], str] | None = None  # rewrites digits (unicode_variants, ocr_scan)
    parts: list[str] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)
    size: int = 0

    def emit(self, value: str | Pii) -> None:
        text = value.text if isinstance(value, Pii) else value
        text = self.disguise(text) if self.disguise else text
        if isinstance(value, Pii):
            self.spans.append({"start": self.size, "end": self.size + len(text), "label": value.label})
        self.parts.append(text)
        self.size += len(text)

    def write(self, pieces: list[str | Pii]) -> None:
        for piece in pieces:
            self.emit(piece)

    def line(self, pieces: list[str | Pii]) -> None:
        self.write([*pieces, "\n"])

    def record(self, kind: str) -> dict:
        return {"text": "".join(self.parts).rstrip("\n"), "spans": self.spans, "kind": kind}


# -- values --------------------------------------------------------------------------------------------------

def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def lead(rng: random.Random, n: int) -> str:
    """n digits that do not start with 0 or 1 (subscriber groups, serials)."""
    return str(rng.randint(2, 9)) + digits(rng, n - 1)


def name(rng: random.Random) -> str:
    return rng.choice(SURNAMES) + rng.choice(SYLLABLES) + rng.choice(SYLLABLES)


def moment(rng: random.Random, first: int = 2019, last: int = 2025) -> datetime.datetime:
    return datetime.datetime(first, 1, 1) + datetime.timedelta(seconds=rng.randrange((last - first + 1) * 31536000))


def birthday(rng: random.Random, first: int = 1935, last: int = 2024) -> datetime.date:
    return moment(rng, first, last).date()


def date_text(rng: random.Random) -> str:
    when = moment(rng)
    return rng.choice((f"{when:%Y-%m-%d}", f"{when:%Y.%m.%d}", f"{when:%Y/%m/%d}", f"{when:%Y%m%d}",
                       f"{when.year}. {when.month}. {when.day}.", f"{when.year}년 {when.month}월 {when.day}일"))


def rrn(rng: random.Random, foreign: bool | None = None, born: datetime.date | None = None,
        seps: tuple[str, ...] = RRN_SEPS) -> Pii:
    """A resident (or, with S = 5-8, foreigner) registration number; both are labelled rrn."""
    foreign = rng.random() < 0.15 if foreign is None else foreign
    born = born or birthday(rng)
    head = f"{born:%y%m%d}{(1 if born.year < 2000 else 3) + rng.randint(0, 1) + (4 if foreign else 0)}"
    if born >= REFORM or rng.random() < 0.05:  # new and changed numbers: random tail (FORMATS.md §1)
        number = head + digits(rng, 6)
    else:
        body = head + f"{rng.randint(0, 95):02d}" + digits(rng, 3)
        total = sum(int(c) * w for c, w in zip(body, RRN_WEIGHTS, strict=True))
        number = body + str(((13 if foreign else 11) - total % 11) % 10)
    return Pii(number[:6] + rng.choice(seps) + number[6:], "rrn")


def corp_no(rng: random.Random) -> str:
    """법인등록번호: registry office, company type, serial, check digit with weights 1,2,1,2..."""
    body = rng.choice(("1101", "1301", "1345", "1201", "1801")) + rng.choice(("11", "12", "31")) + digits(rng, 6)
    total = sum(int(c) * (1 + i % 2) for i, c in enumerate(body))
    return f"{body[:6]}-{body[6:]}{(10 - total % 10) % 10}"


def biz_no(rng: random.Random, sep: str = "-") -> str:
    body = f"{rng.randint(101, 899)}{rng.choice(('01', '05', '81', '86', '23', '90'))}{digits(rng, 4)}"
    total = sum(int(c) * w for c, w in zip(body, BIZ_WEIGHTS, strict=True)) + int(body[8]) * 5 // 10
    number = body + str((10 - total % 10) % 10)
    return sep.join((number[:3], number[3:5], number[5:]))


def phone_groups(rng: random.Random, kind: str) -> list[str]:
    middle = lead(rng, rng.choice((3, 4)))
    match kind:
        case "mobile":
            return ["010", lead(rng, 4), digits(rng, 4)]
        case "legacy" | "seoul" | "area":
            head = {"legacy": rng.choice(("011", "016", "017", "018", "019")), "seoul": "02"}.get(kind)
            return [head or rng.choice(AREAS), middle, digits(rng, 4)]
        case "voip" | "safe":
            return ["070" if kind == "voip" else "050" + rng.choice("2345678"), lead(rng, 4), digits(rng, 4)]
        case "free" | "premium":
            return ["080" if kind == "free" else "060", lead(rng, 3), digits(rng, 4)]
    head = rng.choice(REPRESENTATIVE) if rng.random() < 0.6 else f"1{rng.choice('568')}{digits(rng, 2)}"
    return [head, digits(rng, 4)]


def phone(rng: random.Random, kind: str | None = None, sep: str | None = None, intl: float = 0.12) -> Pii:
    """A dialable Korean number in one of the surface forms of FORMATS.md §2."""
    kind = kind or rng.choices(list(PHONE_KINDS), list(PHONE_KINDS.values()))[0]
    groups = phone_groups(rng, kind)
    if kind in ("mobile", "seoul", "area", "voip") and rng.random() < intl:
        code = rng.choice(COUNTRY_CODES)
        inner = "" if code == "+82" else code[-1] if code[-1] in "- " else rng.choice("- ")
        return Pii(code + inner.join([groups[0][1:], *groups[1:]]), "tell")
    if len(groups) == 3 and sep is None and rng.random() < 0.08:  # the bracket belongs to the number
        return Pii(rng.choice(("({}) {}-{}", "{}){}-{}", "({}){}-{}")).format(*groups), "tell")
    return Pii((rng.choice(PHONE_SEPS) if sep is None else sep).join(groups), "tell")


def account(rng: random.Random, sep: str | None = None) -> tuple[str, Pii]:
    """(bank name, account number) in one of that bank's layouts."""
    names, layouts = rng.choice(BANKS)
    groups = ["".join(rng.choice(piece[1:-1].split("/")) if piece.startswith("[") else digits(rng, int(piece))
                      for piece in group.split("+")) for group in rng.choice(layouts.split()).split("-")]
    sep = rng.choice(("-",) * 5 + ("",) * 3 + (" ",) * 2) if sep is None else sep
    return rng.choice(names.split()), Pii(sep.join(groups), "acc")


def bank_and_number(rng: random.Random) -> tuple[str | Pii, ...]:
    """Bank name before, glued before, or after the number, sometimes with the holder's name."""
    bank, number = account(rng)
    holder = rng.choice(("", "", " " + name(rng), name(rng), f" (예금주 {name(rng)})"))
    style = rng.random()
    if style < 0.7:
        return bank + rng.choice(("", " ", " ")), number, holder
    return number, rng.choice((f" {bank}", f" ({bank})")) + holder


def disguiser(rng: random.Random, mode: str) -> Callable[[str], str]:
    """Rewrite the digits of a text: another digit script, and/or invisible characters between digits."""
    script, _, hidden = mode.partition("+")

    def shift(text: str) -> str:
        if script not in DIGIT_BASES:
            return text
        text = "".join(chr(DIGIT_BASES[script] + int(c)) if "0" <= c <= "9" else c for c in text)
        return text.replace("-", "－") if script == "fullwidth" else text

    def hide(text: str) -> str:
        pairs = [i for i in range(1, len(text)) if text[i - 1].isdigit() and text[i].isdigit()]
        cuts = {i for i in pairs if rng.random() < 0.25} or set(rng.sample(pairs, min(1, len(pairs))))
        return "".join(rng.choice(INVISIBLE) + c if i in cuts else c for i, c in enumerate(text))

    return lambda text: hide(shift(text)) if "invisible" in (script, hidden) else shift(text)


# -- the template language -------------------------------------------------------------------------------------

def _rrn(r: random.Random, arg: str) -> Pii:
    years = {"child": (2015, 2024), "old": (1935, 1960)}.get(arg)
    born = birthday(r, *years) if years else None
    return rrn(r, True if arg == "foreign" else None, born, ("", "-") if arg == "x" else RRN_SEPS)


def _phone(r: random.Random, arg: str, sep: str | None = None) -> Pii:
    return phone(r, r.choice(arg.split(",")) if arg else None, sep)


TOKENS: dict[str, Callable[[random.Random, str], str | Pii | tuple]] = {
    # PII
    "tel": _phone, "telx": partial(_phone, sep=""), "intl": lambda r, a: phone(r, "mobile", intl=1.0),
    "msisdn": lambda r, a: Pii(a + "82" + "".join(phone_groups(r, "mobile"))[1:], "tell", quoted=bool(a)),
    "rrn": _rrn, "acc": lambda r, a: bank_and_number(r),
    "accplain": lambda r, a: (lambda bank, number: (bank + " ", number))(*account(r)),
    "accno": lambda r, a: account(r, "" if a == "x" else None)[1],
    "acclife": lambda r, a: (r.choice(("기업은행", "IBK기업", "기업", "국민은행", "KB국민")) + " 평생계좌 ",
                             Pii(r.choice(("-", "", " ")).join(phone_groups(r, "mobile")), "acc")),
    "kvacc": lambda r, a: (lambda bank, number: (f"bank={bank} account=", number))(*account(r, "")),
    # hard negatives and filler
    "neg": lambda r, a: tuple(fill(r, r.choice(NEGATIVES))),
    "d": lambda r, a: digits(r, int(a)), "lead": lambda r, a: lead(r, int(a)),
    "n": lambda r, a: str(r.randint(2, int(a or 99))), "pick": lambda r, a: r.choice(a.split(",")),
    "name": lambda r, a: name(r), "shop": lambda r, a: r.choice(SHOPS), "company": lambda r, a: r.choice(COMPANIES),
    "org": lambda r, a: r.choice(ORGS), "addr": lambda r, a: f"{r.choice(ORGS)} {r.choice(ROADS)} {r.randint(1, 400)}",
    "date": lambda r, a: date_text(r), "time": lambda r, a: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}",
    "year": lambda r, a: str(r.randint(1995, 2025)), "stamp": lambda r, a: f"{moment(r):%Y%m%d%H%M%S}",
    "ymd": lambda r, a: f"{moment(r):%y%m%d}", "birth": lambda r, a: f"{birthday(r):%y%m%d}",
    "epoch": lambda r, a: str(int((moment(r) - datetime.datetime(1970, 1, 1)).total_seconds()) * 1000),
    "years": lambda r, a: (lambda y: f"{y}-{y + r.randint(30, 90)}")(r.randint(1500, 1930)),
    "price": lambda r, a: f"{r.randint(1, 30000) * 100:,}원", "zip": lambda r, a: f"{r.randint(1000, 63644):05d}",
    "biz": lambda r, a: biz_no(r, "" if a == "x" else "-"), "corp": lambda r, a: corp_no(r),
    "track": lambda r, a: (lambda t: r.choice((t, f"{t[:4]}-{t[4:8]}-{t[8:]}")))(lead(r, 12)),
    "short": lambda r, a: r.choice(SHORT_CODES),
    "mrrn": lambda r, a: f"{birthday(r):%y%m%d}" + r.choice(("-1******", "-*******", "2******", "-4******")),
    "mphone": lambda r, a: r.choice(("010-****-", "010-12**-", "010****", "02-***-")) + digits(r, 4),
    "macc": lambda r, a: r.choice(("110-***-***", "3333-**-***", "1002-***-**")) + digits(r, 3),
    "mcard": lambda r, a: f"{lead(r, 4)}-{digits(r, 2)}**-****-{digits(r, 4)}",
}
TOKEN = re.compile(r"\{(\w+)(?::([^}]*))?\}")
NEGATIVES = (  # POLICY.md hard negatives: numbers a shape-only replacer would take for PII
    "사업자등록번호 {biz}", "법인등록번호 {corp}", "주문번호 {ymd}-{d:7}", "주문번호 {stamp}", "운송장번호 {track}",
    "승인번호 {d:8}", "회원번호 {lead:10}", "고객번호 0{d:9}", "생년월일 {birth}", "주민번호 {mrrn}", "연락처 {mphone}",
    "환불계좌 {macc}", "카드 {mcard}", "내선 {lead:4}", "국번 없이 {short}", "휴대폰 끝자리 {d:4}", "계좌 끝자리 {d:4}",
    "ISBN 978-89-{lead:3}-{d:4}-{d:1}", "ISSN {pick:1598,1738,2287,1226}-{d:4}", "바코드 880{d:10}", "우편번호 {zip}",
    "구 우편번호 {lead:3}-{d:3}", "{date} {time}", "접수일시 {stamp}", "금액 {price}", "희망가 {pick:1500,1600}-1800원",
    "{name}({years})", "{years}년 사이의 유물", "법률 제{n:19999}호", "제{n:60}조의{n:5}", "{year}다{lead:6} 판결",
    "도면 DWG-02-{lead:4}-{d:4}-A", "차량 {n:399}가 {d:4}", "부동산 고유번호 {lead:4}-{year}-{d:6}",
    "특허 10-{year}-{d:7}", "상품권 {track}", "지로번호 {lead:7}", "은행코드 {pick:004,088,020,081,011}",
    "인증번호 {d:6}", "좌표 37.{d:6}, 126.{d:6}",
    "대기번호 {n:300}", "v{n:9}.{n:30}.{n:9} (build {lead:5})", "http://shop.example.kr/order/{stamp}{d:6}",
    "승인 {pick:15,16,18}{d:6}", "예약번호 {d:4}-{d:4}-{d:4}", "수험번호 {lead:8}", "학번 {year}{d:5}",
    "기록 {n:9}:{n:59}.{d:2}", "관중 {lead:5}명", "누적 확진자 {lead:7}명", "{n:40}승 {n:40}패 승률 0.{d:3}",
)


def fill(rng: random.Random, template: str) -> list[str | Pii]:
    """Expand the {token:arg} fields of a template into text and Pii pieces."""
    parts, pieces = TOKEN.split(template), []
    for i in range(0, len(parts), 3):
        pieces += [parts[i]] if parts[i] else []
        if i + 1 < len(parts):
            value = TOKENS[parts[i + 1]](rng, parts[i + 2] or "")
            pieces.extend(value if isinstance(value, tuple) else (value,))
    return pieces


def render(d: Doc, rng: random.Random, positive: bool, document: str,
           noise: Callable[[random.Random, str], str] | None = None) -> Doc:
    """Write a document template; a `+pii||plain` line shows its PII only if chosen in a positive document."""
    lines = document.strip("\n").split("\n")
    able = [i for i, line in enumerate(lines) if line.startswith("+")]
    chosen = ({i for i in able if rng.random() < 0.6} or {rng.choice(able)}) if positive else set()
    for i, line in enumerate(lines):
        if line.startswith("+"):
            pii, _, plain = line[1:].partition("||")
            line = pii if i in chosen else plain
        if line:
            d.line(fill(rng, noise(rng, line) if noise else line))
    return d


def mixed(rng: random.Random, positive: bool, pii: tuple[str, ...], plain: tuple[str, ...], count: int) -> list[str]:
    """`count` plain lines with one to three PII lines spread among them in a positive document."""
    lines = [rng.choice(plain) for _ in range(count)]
    for _ in range(rng.randint(1, 3) if positive else 0):
        lines.insert(rng.randint(0, len(lines)), rng.choice(pii))
    return lines


PII_LINES = (
    "제 번호 {tel:mobile}이에요", "{tel}로 전화 주세요", "가게 번호 {tel:seoul,area,voip} 여기로 예약하면 돼",
    "입금은 {acc} 으로 부탁드려요", "계좌 보내드려요 {acc}", "평생계좌로 보내줘 {acclife}", "주민번호 {rrn} 맞지?",
    "외국인등록번호는 {rrn:foreign}입니다", "해외라서 {intl} 으로 연락 주세요", "팩스 {tel:seoul,area} 로 보내주세요",
    "배달 안심번호 {tel:safe}로 연락 왔어요", "고객센터 {tel:rep} 에 물어봤어요", "수신거부는 {tel:free}",
    "예전 번호 {tel:legacy} 아직 살아있어요", "애 주민번호 {rrn:child} 로 접종 조회돼요", "회비는 {acc}으로!",
    "{tel:premium} 이런 데서 전화 오면 받지 마", "모임통장 {acc} 여기로 모아요",
)
PLAIN_LINES = (
    "인증번호 {d:6} 왔어?", "{neg} 확인 부탁드려요", "{neg}", "{neg}", "끝자리 {d:4} 맞아?", "{price}씩 보내면 돼",
    "{n:12}시에 {n:12}번 출구에서 봐요", "계좌는 이따 문자로 보낼게요", "번호 바뀌면 알려줘", "ㅋㅋㅋ 알겠어",
    "넵 감사합니다!",
)
LOG_PII = (
    "send ok req={d:8} to={telx:mobile} tmpl=ORDER_SHIPPED", "dlr msisdn={msisdn} status=DELIVRD",
    "sms callback={telx:rep} from={telx} bytes={n:90}", "refund queued {kvacc} amount={n:9000}00",
    "kyc verify fail rrn={rrn:x} reason=NAME_MISMATCH", 'profile updated payload={"tel":"{telx}"}',
    "acct verified acct_no={accno:x} bank_cd=088 holder={name}", "fax sent to={tel:seoul,area} pages={n:9}",
    "push fallback sms to={msisdn:+}",
)
LOG_PLAIN = (
    "GET /api/v1/orders/{stamp} 200 {n:900}ms", "payment approved approval_no={d:8} amount={n:900}00 card={mcard}",
    "biz check biz_no={biz:x} result=VALID", "tracking={track} status=IN_TRANSIT", "event ts={stamp} epoch_ms={epoch}",
    "cust_no=0{d:9} grade=VIP", "scan barcode=880{d:10} qty={n:9}", "sms masked to={mphone}", "otp code={d:6} ttl=180",
    "app_ver={n:9}.{n:30}.{n:9} build={lead:5}", "geo lat=37.{d:6} lng=126.{d:6}", "order_id={ymd}-{d:7} state=PAID",
)


# -- tables: csv, tsv, markdown, html, xml, json ---------------------------------------------------------------

def column(template: str) -> Callable[[random.Random], list[tuple]]:
    return lambda rng: [tuple(fill(rng, template))]


# (Korean headers, English headers, maker of one row's cells); "|" splits a column pair, "/" lists header choices
PII_COLUMNS = (
    ("휴대폰/휴대전화/핸드폰/HP", "phone/mobile/cell", column("{tel:mobile,mobile,mobile,legacy,safe}")),
    ("전화번호/자택전화/직장전화/팩스/대표번호", "tel/office_tel/fax", column("{tel:seoul,area,voip,rep,free}")),
    ("주민등록번호/주민번호", "rrn/resident_no/jumin", column("{rrn}")),
    ("외국인등록번호", "alien_reg_no/frn", column("{rrn:foreign}")),
    ("은행|계좌번호", "bank|account_no", lambda rng: [(x,) for x in account(rng)]),
    ("환불계좌/입금계좌", "refund_account", column("{accplain}")),
)
NEGATIVE_COLUMNS = (
    ("가입일/등록일/가입일자", "joined/created_at", column("{date}")),
    ("금액/누적구매액", "amount/total", column("{price}")),
    ("회원번호", "member_no/member_id", column("{lead:9}")), ("고객번호", "customer_no", column("0{d:9}")),
    ("주문번호", "order_no/order_id", column("{ymd}-{d:7}")),
    ("사업자번호/사업자등록번호", "biz_no/brn", column("{biz}")),
    ("운송장번호/송장번호", "tracking_no/invoice_no", column("{track}")), ("우편번호", "zip/postcode", column("{zip}")),
    ("생년월일", "birth/dob", column("{birth}")), ("연락처", "contact", column("{mphone}")),
    ("주민번호_마스킹", "rrn_masked", column("{mrrn}")), ("승인번호", "approval_no", column("{d:8}")),
    ("등급", "grade", column("{pick:VIP,일반,골드,실버}")),
)
NAME_COLUMN = ("이름/성명", "name", column("{name}"))
HEADERLESS_UNSAFE = ("고객번호", "주문번호")  # without a header these read as a landline and an RRN


def table(rng: random.Random, positive: bool, header: bool = True) -> tuple[list[str], list[list[tuple]]]:
    """A member list: (header, rows of cells); a cell is a tuple of str and Pii pieces."""
    negatives = [c for c in NEGATIVE_COLUMNS if header or c[0] not in HEADERLESS_UNSAFE]
    pii = [c for c in PII_COLUMNS if c[0] != "외국인등록번호" or rng.random() < 0.3]  # keep FRNs a minority
    columns = rng.sample(pii, rng.randint(1, 3)) if positive else []
    columns += rng.sample(negatives, rng.randint(1, 3) + (not positive))
    rng.shuffle(columns)
    columns.insert(0 if rng.random() < 0.8 else rng.randint(0, len(columns)), NAME_COLUMN)
    english = rng.random() < 0.35
    head = [rng.choice(choices.split("/")) for c in columns for choices in c[english].split("|")]
    return head, [[cell for c in columns for cell in c[2](rng)] for _ in range(rng.randint(2, 6))]


def put_row(d: Doc, cells: list[tuple], sep: str, start: str = "", end: str = "\n", quote: bool = False) -> None:
    d.emit(start)
    for i, cell in enumerate(cells):
        mark = '"' if quote or (sep == "," and any("," in str(p) for p in cell if isinstance(p, str))) else ""
        d.write([sep if i else "", mark, *cell, mark])
    d.emit(end)


def csv_export(rng: random.Random, positive: bool, sep: str = ",") -> Doc:
    d, header = Doc(), rng.random() < 0.75
    head, rows = table(rng, positive, header)
    quote = sep == "," and rng.random() < 0.4
    d.emit("\ufeff" if sep == "," and rng.random() < 0.2 else "")  # Excel's byte-order mark
    for row in ([[(h,) for h in head]] if header else []) + rows:
        put_row(d, row, sep, quote=quote)
    return d


def markdown_table(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    d.emit(rng.choice(("### 회원 명단\n\n", "**고객 목록**\n", "")))
    put_row(d, [(h,) for h in head], " | ", "| ", " |\n")
    d.emit("|" + "|".join(rng.choice(("---", ":---", ":---:")) for _ in head) + "|\n")
    for row in rows:
        put_row(d, row, " | ", "| ", " |\n")
    return d


def tel_link(rng: random.Random, cell: tuple) -> tuple:
    """Wrap a phone cell in <a href="tel:...">; the href digits are a second tell span."""
    number = cell[0]
    if not (isinstance(number, Pii) and number.label == "tell" and number.text[0] in "0(") or rng.random() < 0.6:
        return cell
    return ('<a href="tel:', Pii(re.sub(r"\D", "", number.text), "tell"), '">', number, "</a>")


def html_table(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    d.emit(f'<table class="{rng.choice(("member-list", "tbl_customer", "grid"))}">\n')
    put_row(d, [(h,) for h in head], "</th><th>", "  <tr><th>", "</th></tr>\n")
    for row in rows:
        put_row(d, [tel_link(rng, cell) for cell in row], "</td><td>", "  <tr><td>", "</td></tr>\n")
    d.emit("</table>\n")
    if positive and rng.random() < 0.4:
        d.line(fill(rng, '<button class="call" data-tel="{telx:rep,seoul,mobile}">전화 상담</button>'))
    return d


def xml_record(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    d.emit(f'<?xml version="1.0" encoding="UTF-8"?>\n<members exported="{moment(rng):%Y-%m-%dT%H:%M:%S}">\n')
    attributes = rng.random() < 0.3
    for row in rows:
        d.emit(f'  <member id="{lead(rng, 7)}"' + ("" if attributes else ">\n"))
        for tag, cell in zip(head, row, strict=True):
            put_row(d, [cell], "", f' {tag}="' if attributes else f"    <{tag}>", '"' if attributes else f"</{tag}>\n")
        d.emit(" />\n" if attributes else "  </member>\n")
    d.emit("</members>")
    return d


def row_object(head: list[str], row: list[tuple]) -> dict:
    """One table row as a JSON object; the bank and number columns become a nested object."""
    obj, pairs = {}, iter(zip(head, row, strict=True))
    for key, cell in pairs:
        if key in ("은행", "bank"):
            number = next(pairs)[1][0]
            obj["계좌" if key == "은행" else "account"] = {key: cell[0], "번호" if key == "은행" else "number": number}
        else:
            obj[key] = cell[0] if len(cell) == 1 else cell
    return obj


def put_json(d: Doc, node: object, indent: int, depth: int = 0) -> None:
    pad, close = ("\n" + " " * indent * (depth + 1), "\n" + " " * indent * depth) if indent else ("", "")
    if isinstance(node, dict | list):
        items = node.items() if isinstance(node, dict) else [(None, v) for v in node]
        d.emit("{" if isinstance(node, dict) else "[")
        for i, (key, value) in enumerate(items):
            d.emit(("," if i else "") + pad + ("" if key is None else json.dumps(key, ensure_ascii=False) + ": "))
            put_json(d, value, indent, depth + 1)
        d.emit(close + ("}" if isinstance(node, dict) else "]"))
    elif isinstance(node, int) or (isinstance(node, Pii) and not node.quoted):
        d.emit(node if isinstance(node, Pii) else str(node))
    else:
        pieces = node if isinstance(node, tuple) else (node,)
        d.write(['"', *(p if isinstance(p, Pii) else json.dumps(p, ensure_ascii=False)[1:-1] for p in pieces), '"'])


def json_record(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    objects = [row_object(head, row) for row in rows]
    for obj in objects:
        obj["order"] = {"order_id": f"{moment(rng):%Y%m%d%H%M%S}{digits(rng, 3)}", "amount": rng.randint(1, 900) * 100,
                        "biz_no": biz_no(rng, rng.choice(("", "-"))), "created_at": f"{moment(rng):%Y%m%d%H%M%S}"}
        if positive and rng.random() < 0.3:
            obj["msisdn"] = TOKENS["msisdn"](rng, rng.choice(("", "+")))
    shape = rng.randrange(3)
    body = objects[0] if shape == 0 else objects if shape == 1 else {"status": "ok", "data": {"members": objects}}
    put_json(d, body, rng.choice((0, 2, 4)))
    return d


# -- logs, chats, scans ----------------------------------------------------------------------------------------

def app_log(rng: random.Random, positive: bool) -> Doc:
    d, when, style = Doc(), moment(rng), rng.randrange(3)
    service = rng.choice(("sms-gateway", "payment-api", "kyc-worker", "order-svc", "notify"))
    for template in mixed(rng, positive, LOG_PII, LOG_PLAIN, rng.randint(2, 6)):
        when += datetime.timedelta(milliseconds=rng.randint(1, 90000))
        stamp = (f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}", f"{when:%Y-%m-%dT%H:%M:%S}+09:00",
                 f"[{when:%Y/%m/%d %H:%M:%S}]")[style]
        d.line([f"{stamp} {rng.choice(('INFO ', 'INFO ', 'DEBUG', 'WARN '))} [{service}] ", *fill(rng, template)])
    return d


def messenger_chat(rng: random.Random, positive: bool) -> Doc:
    """A KakaoTalk export, PC style `[name] [오후 3:12] text` or mobile style `2024. 3. 5. 오후 3:12, name : text`."""
    d, when, people = Doc(), moment(rng), [name(rng) for _ in range(rng.randint(2, 4))]
    pc = rng.random() < 0.6
    d.emit(f"--------------- {when.year}년 {when.month}월 {when.day}일 {'월화수목금토일'[when.weekday()]}요일 "
           "---------------\n" if pc else f"{people[0]} 님과 카카오톡 대화\n저장한 날짜 : {when:%Y-%m-%d %H:%M:%S}\n\n")
    for template in mixed(rng, positive, PII_LINES, PLAIN_LINES, rng.randint(2, 7)):
        when += datetime.timedelta(minutes=rng.randint(0, 9))
        clock = f"{'오전' if when.hour < 12 else '오후'} {(when.hour - 1) % 12 + 1}:{when.minute:02d}"
        who = rng.choice(people)
        d.line([f"[{who}] [{clock}] " if pc else f"{when.year}. {when.month}. {when.day}. {clock}, {who} : ",
                *fill(rng, template)])
    return d


def unicode_variants(rng: random.Random, positive: bool) -> Doc:
    """Numbers in full-width, Arabic-Indic or mathematical bold digits, or with invisible characters inside."""
    d = Doc(disguise=disguiser(rng, rng.choice(DISGUISES)))
    for template in mixed(rng, positive, PII_LINES + LOG_PII, PLAIN_LINES, rng.randint(0, 2)) + ["{neg}"]:
        d.line(fill(rng, template))
    return d


def ocr_noise(rng: random.Random, line: str) -> str:
    """Scanner damage to the template text (never to a value): spaced-out or broken labels, stray marks."""
    def damage(match: re.Match) -> str:
        word, roll = match.group(), rng.random()
        if roll < 0.2:
            return " ".join(word)
        cut = rng.randint(1, len(word) - 1)
        return word[:cut] + "\n" + word[cut:] if roll < 0.28 else word

    parts = re.split(r"(\{[^}]*\})", line)
    text = "".join(part if part.startswith("{") else re.sub(r"[가-힣]{3,}", damage, part) for part in parts)
    return rng.choice(("", "", "", "| ", "ㆍ", "' ")) + text.replace(": ", rng.choice((": ", " : ", ":", " ; ", " . ")))


def ocr_scan(rng: random.Random, positive: bool) -> Doc:
    """Text from a scanned page: `010 - 1234 - 5678`, stray full-width numbers, damaged labels."""
    sep, fullwidth = rng.choice((" - ", "- ", " -", "-", " ")), disguiser(rng, "fullwidth")
    d = Doc(disguise=lambda text: fullwidth(text) if rng.random() < 0.15 else text.replace("-", sep))
    d.line(fill(rng, rng.choice(("[스캔] SCAN_{stamp}.pdf 1/{n:3}", "- {n:5} -", "팩스 수신 {date} {time} P.{n:9}"))))
    return render(d, rng, positive, rng.choice(DOCUMENTS["form"] + SCANS), ocr_noise)


# -- documents in the template language: `+pii||plain` lines, see render() ------------------------------------
DOCUMENTS = {
    "form": ("""
[{pick:회원 가입 신청서,서비스 이용 신청서,환불 신청서,장학금 신청서}]
성명: {name}
+주민등록번호: {rrn}||주민등록번호: {mrrn}
+외국인등록번호: {rrn:foreign}||생년월일: {birth}
+휴대전화: {tel:mobile,legacy}||휴대전화: {mphone}
+자택전화: {tel:seoul,area,voip}
주소: {addr} (우 {zip})
+환불계좌: {acc}||환불계좌: 신청인 명의 통장 사본 첨부
+입금계좌: {acclife}
신청일: {date} / 접수번호: {year}-{d:6}""", """
[진료 접수증] {pick:미소치과,새봄내과의원,튼튼정형외과}
환자명: {name}
+주민등록번호: {rrn}||생년월일: {birth}
+연락처: {tel:mobile}||연락처: {mphone}
+보호자 연락처: {tel:mobile,legacy}
진료과: {pick:내과,정형외과,소아청소년과} / 대기번호 {n:99}
내원일시: {date} {time}""", """
[{year}년 귀속 연말정산 부양가족 명세]
근로자 {name} / 사번 {lead:7} / 사업자등록번호 {biz}
관계 | 성명 | 주민등록번호 | 기본공제
+본인 | {name} | {rrn} | ○||본인 | {name} | {mrrn} | ○
+배우자 | {name} | {rrn} | ○||배우자 | {name} | {mrrn} | ×
+자녀 | {name} | {rrn:child} | ○||자녀 | {name} | {birth} | ○
+부 | {name} | {rrn:old} | ○""", """
부동산 임대차 계약서
소재지: {addr} / 보증금: 금 {price}정
+임대인: {name} 주민등록번호 {rrn} 전화 {tel:mobile}||임대인: 주식회사 {company} 법인등록번호 {corp}
+임차인: {name} 주민등록번호 {rrn}||임차인: {name} 생년월일 {birth}
+입금계좌: {acc}||입금계좌: 계약 당일 고지
중개사무소: {company}공인중개사 사업자등록번호 {biz}
+중개사무소 전화: {tel:seoul,area}
계약일: {date}"""),
    "sms_notice": ("""
[Web발신]
[{pick:CJ대한통운,한진택배,롯데택배,우체국택배}] 고객님의 상품이 {date} 배송 예정입니다.
운송장번호: {track}
+배송기사 {name} {tel:mobile,safe}||배송 문의는 앱에서 해주세요""", """
[Web발신]
[{shop}] 주문 {stamp} 가상계좌 발급
+입금계좌: {acc}||결제수단: 카드 {mcard}
금액: {price} / 입금기한: {date} {time}""", """
[Web발신]
[{pick:KB국민카드,신한카드,현대카드}] {name}님 {date} {time} {price} 일시불 승인 {shop}
누적 {price} / 승인번호 {d:8}
+분실신고 {tel:rep}""", """
[Web발신]
[{shop}] 인증번호 [{d:6}]를 입력해주세요.
+본인 요청이 아니면 {tel:rep,free} 로 신고하세요""", """
(광고)[{shop}] 봄맞이 최대 {n:70}% 할인! {date}까지
+무료수신거부 {tel:free}||수신거부: 앱 설정 > 알림""", """
[Web발신]
[{pick:국민,신한,우리,하나,농협}] {macc} 입금 {price} {name} 잔액 {price}
+문의 {tel:rep}"""),
    "contact_card": ("""
--
{name} {pick:과장,대리,팀장,이사} | {pick:영업1팀,구매팀,경영지원팀}
(주){company}
+T. {tel:seoul,area,rep}||T. 대표 내선 {lead:4}
+M. {tel:mobile,legacy}
+F. {tel:seoul,area}
{addr} ({zip})
{pick:sales,info,contact}@example.co.kr | 사업자등록번호 {biz}""", """
BEGIN:VCARD
VERSION:3.0
FN:{name}
ORG:{company};{pick:영업팀,기술지원팀}
+TEL;TYPE=CELL:{tel:mobile}
+TEL;CELL:{intl}
+TEL;TYPE=WORK,VOICE:{tel:seoul,area,voip}
+TEL;TYPE=FAX:{tel:seoul,area}
EMAIL;TYPE=INTERNET:{pick:kim,lee,park}{d:2}@example.com
ADR;TYPE=WORK:;;{pick:테헤란로,세종대로} {n:400};{pick:서울,부산};;{zip};KR
NOTE:사업자등록번호 {biz}
REV:{stamp}
END:VCARD""", """
{company}
{name}  {pick:대표이사,실장,원장}
+HP {tel:mobile}||HP 010-****-{d:4}
+Tel {tel:seoul,area}  Fax {tel:seoul,area}
+대표번호 {tel:rep}
{addr}"""),
    "receipt": ("""
{shop}
사업자번호 {biz}  대표 {name}
{addr}
+TEL {tel:seoul,area,voip}
[매출전표] {date} {time}  POS:{n:9}  No.{d:4}
--------------------------------
{pick:생수 2L,라면 5입,우유 1L}   {n:9}   {price}
  880{d:10}
합계 {price}
카드번호 {mcard}  승인번호 {d:8}  할부 일시불
+고객센터 {tel:rep}
교환/환불은 {n:14}일 이내 영수증 지참""", """
[배달 주문서] {shop}
주문번호 {ymd}-{d:7}
+안심번호 {tel:safe}||연락처 {mphone} (안심번호 사용)
배달주소 {addr}
결제 {price} (카드 {mcard})
+가게 전화 {tel:seoul,area,voip}"""),
    "family_event": ("""
[부고]
故 {name}님께서 {date} 별세하셨기에 삼가 알려드립니다. (향년 {pick:67,72,78,81,85,88,91}세)
빈소: {pick:서울아산병원,부산대병원,분당서울대병원} 장례식장 {n:20}호실
+빈소 전화: {tel:seoul,area}
발인: {date} {time}
+상주: {name} {tel:mobile}||상주: {name}
마음 전하실 곳
+상주 {name} {acc}||계좌번호는 유족께 문의 바랍니다
+{name} {acc}""", """
{name} ♥ {name} 결혼합니다
일시: {date} {pick:오전 11시,낮 12시 30분,오후 2시}
장소: {pick:더채플,라마다호텔,아펠가모} {n:9}층 그랜드홀
+예식장 문의 {tel:seoul,area,rep}
모바일 청첩장 https://m-card.kr/w/{stamp}{d:4}
마음 전하실 곳
+신랑측 {name} {acc}||축의금은 정중히 사양합니다
+신부측 {name} {acc}
+신랑 연락처 {tel:mobile}"""),
    "public_notice": ("""
{org} 공고 제{year}-{n:999}호
{pick:어르신 교통비 지원 사업 안내,불법 주정차 과태료 부과 사전 통지,공유재산 대부 일반입찰 공고}
「{pick:지방재정법,도로교통법,주차장법}」 제{n:60}조의{n:5}에 따라 다음과 같이 공고합니다.
1. 기간: {date} ~ {date}
2. 참고: {neg}
+3. 문의: {org} {pick:복지정책과,교통행정과,재무과} ☎ {tel:seoul,area}||3. 문의: {org} 민원실 내선 {lead:4}
+   대표번호 {tel:rep} / 팩스 {tel:seoul,area}
+4. 납부계좌: {accplain}(예금주 {org})||4. 납부: 전자납부번호 {d:19}
※ 국번 없이 {short} 또는 {short}
{date}""",),
    "classified_ad": ("""
[{pick:팝니다,판매,급처}] {pick:갤럭시 S23 256GB,아이폰 15 프로,닌텐도 스위치,유모차}
가격: {price} (택포) / {neg}
구매일 {date}, 상태 깨끗합니다
+연락: {tel:mobile,legacy} 문자 주세요||연락은 채팅으로만 주세요
+안심번호 {tel:safe}
+입금: {acc}||선입금 요구는 사기입니다
+카톡 안 되면 {tel:mobile,voip}으로""", """
[구인] {shop} 주말 아르바이트
시급 {pick:10030원,12000원} / 근무 {time}-{time}
+문의 {tel:mobile} {name} 점장||문의는 방문 접수만
위치: {addr}
{neg}""", """
[차량 판매] {pick:아반떼 CN7,쏘렌토 MQ4} {year}년식 {n:99},{d:3}km
차량번호 {n:399}가 {d:4} / 가격 {price}
+연락처 {tel:mobile}||연락처 {mphone}
+계약금 입금 {acc}"""),
    "registry_extract": ("""
등기사항전부증명서(말소사항 포함) - 집합건물
고유번호 {lead:4}-{year}-{d:6}
[집합건물] {addr} 제{n:20}동 제{n:999}호
【 갑 구 】 (소유권에 관한 사항)
순위번호 | 등기목적 | 접수 | 권리자 및 기타사항
1 | 소유권보존 | {date} 제{lead:5}호 | 소유자 주식회사{company} {corp}
+2 | 소유권이전 | {date} 제{lead:5}호 | 소유자 {name} {rrn}||2 | 소유권이전 | {date} 제{lead:5}호 | 소유자 {name} {mrrn}
+3 | 소유권일부이전 | {date} 제{lead:5}호 | 공유자 지분 2분의 1 {name} {rrn}
【 을 구 】 (소유권 이외의 권리에 관한 사항)
1 | 근저당권설정 | {date} 제{lead:5}호 | 채권최고액 금{price} 근저당권자 주식회사{pick:국민은행,신한은행} {corp}
2 | 임의경매개시결정 | {date} 제{lead:5}호 | {pick:서울중앙지방법원,수원지방법원} {year}타경{lead:5}
+신청인 연락처 {tel:mobile}
-- 이하 여백 --
발행번호 {d:4}-{d:4}-{d:4}-{d:4} / 발행일 {date}""",),
}
SCANS = ("""
주 민 등 록 표 ( 등 본 )
발급번호 {d:4}-{d:4}-{d:4}-{d:4}
세대주 성명 {name}  전입 {date}
번호 | 관계 | 성명 | 주민등록번호 | 전입일
+1 | 본인 | {name} | {rrn} | {date}||1 | 본인 | {name} | {mrrn} | {date}
+2 | 배우자 | {name} | {rrn} | {date}||2 | 배우자 | {name} | {mrrn} | {date}
+3 | 자녀 | {name} | {rrn:child} | {date}
위 등본의 원본 내용과 틀림없음을 증명합니다. {date}""", """
{pick:KB국민은행,신한은행,NH농협,우체국} 보통예금 통장
+계좌번호: {accno}||계좌번호: {macc}
예금주: {name}
신규일: {date} / {pick:강남,역삼,해운대}지점
+지점 전화: {tel:seoul,area}""")


def document(kind: str, rng: random.Random, positive: bool) -> Doc:
    return render(Doc(), rng, positive, rng.choice(DOCUMENTS[kind]))


GENRES: dict[str, Callable[[random.Random, bool], Doc]] = {
    "csv_export": csv_export, "tsv_export": partial(csv_export, sep="\t"), "markdown_table": markdown_table,
    "html_table": html_table, "xml_record": xml_record, "json_record": json_record, "app_log": app_log,
    "messenger_chat": messenger_chat, "ocr_scan": ocr_scan, "unicode_variants": unicode_variants,
    **{kind: partial(document, kind) for kind in DOCUMENTS},
}
KINDS: tuple[str, ...] = tuple(GENRES)


def generate(seed: int, documents: int) -> list[dict]:
    """Labelled documents, the genres taken in turn; each document has its own generator, seeded by (seed, index)."""
    records = []
    for i in range(documents):
        kind, rng = KINDS[i % len(KINDS)], random.Random(f"{seed}:{i}")
        positive = rng.random() >= NEGATIVE_SHARE
        records.append(GENRES[kind](rng, positive).record(kind))
        assert bool(records[-1]["spans"]) == positive, (kind, records[-1])
    return records


def write(path: str | Path, records: list[dict]) -> None:
    with Path(path).open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    write(args.output, generate(args.seed, args.documents))


if __name__ == "__main__":
    main()
