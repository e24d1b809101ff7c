"""PII values as FORMATS.md writes them, for the labelled-set generator (synth.py): RRNs and foreigner
numbers (legacy check digits and post-2020 random tails, every separator), phone numbers of every kind, bank
accounts in each bank's layouts, and the hard negatives of POLICY.md with the word that introduces each."""

import datetime
import random
from collections.abc import Callable

FULL = str.maketrans("0123456789-", "０１２３４５６７８９－")


# -- values ---------------------------------------------------------------------------------------
def random_digits(r: random.Random, n: int) -> str:
    return "".join(r.choice("0123456789") for _ in range(n))


def clock(digits: str) -> str:
    """Four random digits as a real minute and second (a 14-digit timestamp's last four)."""
    return f"{int(digits[:2]) % 60:02d}{int(digits[2:]) % 60:02d}"


def rrn(r: random.Random, foreign: bool = False) -> str:
    """13 digits: a real birth date, digit 7 by century and sex, a legacy tail with its check digit or a
    post-2020 random one."""
    born = datetime.date(1940, 1, 1) + datetime.timedelta(days=r.randrange(0, 365 * 84))
    s = (1 if born.year < 2000 else 3) + r.randrange(2) + (4 if foreign else 0)
    head = born.strftime("%y%m%d") + str(s)
    if r.random() < 0.6:  # before the reform: region, order, check digit
        body = head + random_digits(r, 5)
        total = sum(int(d) * w for d, w in zip(body, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5), strict=True))
        check = (11 - total % 11) % 10
        return body + str((check + 2) % 10 if foreign else check)
    return head + random_digits(r, 6)


def rrn_surface(r: random.Random, digits: str, table: bool = False) -> str:
    seps = ["-", "-", "-", "", " ", " - ", "–", "."] + (["."] * 2 + [" "] * 2 if table else [])
    text = digits[:6] + r.choice(seps) + digits[6:]
    return text.translate(FULL) if r.random() < 0.06 else text


def phone(r: random.Random, kind: str | None = None) -> tuple[str, str]:
    """A dialable number as written, and its kind."""
    kind = kind or r.choice(["mobile"] * 5 + ["legacy", "seoul", "regional", "regional", "voip", "safe", "tollfree",
                                              "intl"])
    sep = r.choice(["-"] * 6 + [".", " ", "", "ㅡ"])
    mid4 = str(r.randint(2, 9)) + random_digits(r, 3)
    if kind == "mobile":
        return f"010{sep}{mid4}{sep}{random_digits(r, 4)}", kind
    if kind == "legacy":
        return f"01{r.choice('16789')}{sep}{r.randint(200, 999)}{sep}{random_digits(r, 4)}", kind
    if kind == "seoul":
        mid = mid4 if r.random() < 0.5 else str(r.randint(200, 999))
        if r.random() < 0.2:
            return f"(02) {mid}-{random_digits(r, 4)}" if r.random() < 0.5 else f"02){mid}-{random_digits(r, 4)}", kind
        return f"02{sep}{mid}{sep}{random_digits(r, 4)}", kind
    if kind == "regional":
        area = r.choice(["031", "032", "033", "041", "042", "043", "044", "051", "052", "053", "054", "055", "061",
                         "062", "063", "064"])
        mid = mid4 if r.random() < 0.5 else str(r.randint(200, 999))
        return f"{area}{sep}{mid}{sep}{random_digits(r, 4)}", kind
    if kind == "voip":
        return f"070{sep}{mid4}{sep}{random_digits(r, 4)}", kind
    if kind == "safe":
        return f"050{r.randint(2, 8)}{sep}{mid4}{sep}{random_digits(r, 4)}", kind
    if kind == "tollfree":
        return f"080{sep}{r.randint(200, 999)}{sep}{random_digits(r, 4)}", kind
    if kind == "representative":
        return f"{r.choice(['1588', '1577', '1544', '1566', '1599', '1600', '1644', '1661', '1670', '1688', '1800', '1833', '1855', '1899'])}-{random_digits(r, 4)}", kind  # noqa: E501
    if kind == "landline":  # contiguous, as after a short label
        return r.choice(["02", "031", "051", "053", "062"]) + str(r.randint(2, 9)) + random_digits(r, r.choice([6, 7])), kind
    rest = f"{mid4}-{random_digits(r, 4)}"
    return r.choice([f"+82-10-{rest}", f"+82 10 {mid4} {random_digits(r, 4)}", f"+82 (0)10-{rest}", f"0082-10-{rest}",
                     f"+8210{mid4}{random_digits(r, 4)}"]), kind


BANK_LAYOUTS = {  # bank names as written -> layouts (digit groups); FORMATS.md section 3
    ("KB국민은행", "국민은행", "국민", "KB"): [(6, 2, 6), (3, 2, 4, 3)],
    ("신한은행", "신한", "신한銀"): [(3, 3, 6), (3, 2, 6)],
    ("우리은행", "우리"): [(4, 3, 6)],
    ("하나은행", "KEB하나은행", "하나"): [(3, 6, 5), (3, 6, 3)],
    ("NH농협은행", "농협", "NH농협", "농협중앙회"): [(3, 4, 4, 2)],
    ("지역농협", "단위농협"): [(3, 4, 4, 2), (6, 2, 6)],
    ("IBK기업은행", "기업은행", "기업", "IBK"): [(3, 6, 2, 3), (3, 2, 6, 1)],
    ("SC제일은행", "SC제일"): [(3, 2, 6)],
    ("카카오뱅크", "카뱅", "카카오"): [(4, 2, 7)],
    ("토스뱅크", "토스"): [(4, 4, 4)],
    ("케이뱅크", "K뱅크"): [(3, 3, 6)],
    ("우체국",): [(6, 2, 6)],
    ("새마을금고", "MG새마을금고"): [(4, 2, 7), (4, 4, 4, 1)],
    ("수협은행", "수협"): [(4, 4, 4)],
    ("부산은행", "BNK부산은행"): [(3, 4, 4, 2)],
    ("대구은행", "iM뱅크", "DGB대구은행"): [(3, 2, 6, 1)],
    ("경남은행",): [(3, 9, 1)],
    ("광주은행",): [(3, 3, 6)],
    ("신협",): [(3, 3, 6)],
    ("KDB산업은행", "산업은행"): [(3, 8, 3)],
    ("제주은행",): [(3, 6, 3)],
    ("전북은행",): [(1, 3, 2, 6, 1)],
    ("한국씨티은행", "씨티은행"): [(3, 6, 3)],
    ("도이치은행", "HSBC은행", "중국공상은행", "미즈호은행", "BNP파리바은행", "뱅크오브아메리카"): [(3, 6, 3), (4, 6, 2)],
}
PREFIXES = {"우리은행": "1002", "카카오뱅크": "3333", "카뱅": "3355", "토스뱅크": "1000", "새마을금고": "9002"}


def account(r: random.Random, bank: str | None = None) -> tuple[str, str]:
    """(bank name as written, account number as written)."""
    names, layouts = r.choice(list(BANK_LAYOUTS.items())) if bank is None else \
        next((k, v) for k, v in BANK_LAYOUTS.items() if bank in k)
    name = bank or r.choice(names)
    groups = r.choice(layouts)
    digits = random_digits(r, sum(groups))
    if name in PREFIXES:
        digits = PREFIXES[name] + digits[4:]
    style = r.random()
    sep = "-" if style < 0.6 else (" " if style < 0.7 else "")
    parts, at = [], 0
    for g in groups:
        parts.append(digits[at:at + g])
        at += g
    return name, sep.join(parts)


def business_number(r: random.Random) -> str:
    d = [int(c) for c in random_digits(r, 9)]
    total = sum(a * b for a, b in zip(d, (1, 3, 7, 1, 3, 7, 1, 3, 5), strict=True)) + d[8] * 5 // 10
    s = "".join(map(str, d)) + str((10 - total % 10) % 10)
    return f"{s[:3]}-{s[3:5]}-{s[5:]}"


def ean13_like_rrn(r: random.Random) -> str:
    """An 880 barcode or drug code whose first 7 digits also read as a birth date and digit 7 in 1-8."""
    while True:
        body = "880" + f"{r.randint(1, 12):02d}" + f"{r.randint(1, 28):02d}"[:1] + random_digits(r, 6)
        body = body[:12]
        total = sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body))
        code = body + str((10 - total % 10) % 10)
        if code[6] in "12345678" and 1 <= int(code[2:4]) <= 12 and 1 <= int(code[4:6]) <= 31:
            return code


# -- negatives ------------------------------------------------------------------------------------
def negative(r: random.Random) -> tuple[str, str]:
    """(cue word, value) of a number that is not PII, by POLICY.md."""
    y = r.randint(1990, 2025)
    options: list[Callable[[], tuple[str, str]]] = [
        lambda: ("사업자등록번호", business_number(r)),
        lambda: ("법인등록번호", f"{r.choice(['110111', '130111', '180111', '134511'])}-{random_digits(r, 7)}"),
        lambda: ("주문번호", f"{y % 100:02d}{r.randint(1, 12):02d}{r.randint(1, 28):02d}-{random_digits(r, 7)}"),
        lambda: ("운송장번호", f"{random_digits(r, 4)}-{random_digits(r, 4)}-{random_digits(r, 4)}"),
        lambda: ("승인번호", str(r.randint(15000000, 18999999))),
        lambda: ("ISSN", f"{r.choice(['1598', '1738', '1226', '1599'])}-{random_digits(r, 4)}"),
        lambda: ("ISBN", f"978-89-{random_digits(r, 3)}-{random_digits(r, 4)}-{r.randint(0, 9)}"),
        lambda: ("상품코드", ean13_like_rrn(r)),
        lambda: ("의약품 표준코드", ean13_like_rrn(r)),
        lambda: ("바코드", ean13_like_rrn(r)),
        lambda: ("고객번호", "0" + random_digits(r, 9)),
        lambda: ("회원번호", random_digits(r, 12)),
        lambda: ("예약번호", f"{random_digits(r, 4)}-{random_digits(r, 4)}-{random_digits(r, 4)}"),
        lambda: ("일시", f"{y}{r.randint(1, 12):02d}{r.randint(1, 28):02d}{r.randint(0, 23):02d}{clock(random_digits(r, 4))}"),
        lambda: ("기간", f"{y}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} ~ {y}.{r.randint(1, 12)}.{r.randint(1, 28)}"),  # noqa: E501
        lambda: ("금액", f"{r.randint(1, 999):,},{r.randint(0, 999):03d}원"),
        lambda: ("생몰", f"({r.randint(1500, 1700)}-{r.randint(1701, 1800)})"),
        lambda: ("가격대", f"{r.randint(15, 18)}00-{r.randint(18, 19)}00원"),
        lambda: ("연락처", f"010-****-{random_digits(r, 4)}"),
        lambda: ("주민번호", f"{random_digits(r, 6)}-{r.randint(1, 4)}******"),
        lambda: ("계좌", f"110-***-***{random_digits(r, 3)}"),
        lambda: ("긴급", r.choice(["112", "119", "1330", "1345", "120"])),
        lambda: ("내선", random_digits(r, 4)),
        lambda: ("우편번호", random_digits(r, 5)),
        lambda: ("차량번호", f"{r.randint(10, 399)}{r.choice('가나다라마거너더러')}{random_digits(r, 4)}"),
        lambda: ("사건", f"{y}다{r.randint(1000, 299999)}"),
        lambda: ("도면", f"DWG-02-{random_digits(r, 4)}-{random_digits(r, 4)}-A"),
        lambda: ("특허출원", f"10-{y}-{random_digits(r, 7)}"),
        lambda: ("부동산 고유번호", f"{random_digits(r, 4)}-{random_digits(r, 4)}-{random_digits(r, 6)}"),
        lambda: ("버전", f"{r.randint(1, 9)}.{r.randint(0, 30)}.{r.randint(0, 99)}"),
    ]
    return r.choice(options)()
