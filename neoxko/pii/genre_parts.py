"""The values and the template language of the genre generator (genres.py): RRNs, phone numbers and accounts in
every written form, the hard negatives, documents with their gold spans. Written from POLICY.md and FORMATS.md
alone, like genres.py."""

from __future__ import annotations

import datetime
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

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
