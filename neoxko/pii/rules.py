"""The rules: which numbers of the shapes found (shapes.py) are PII, by the cues around them (cues.py) and the
structure they stand in (context.py): a table's header, a form's label, a key. Each rule adds candidates
(confidence, start, end, label); replace.py keeps the most confident of those that overlap.
"""

import datetime
import re
import time

from neoxko.pii.context import Structure, open_html_cells
from neoxko.pii.cues import ALL_CUES, COMPANY, NOT_PHONE_SHAPED, NOT_RRN_SHAPED, kinds
from neoxko.pii.shapes import (
    ACC_WINDOW,
    BANK_AFTER,
    CITY,
    COMPANY_BEFORE,
    COMPANY_WORD,
    COUNTRY_CODE_BEFORE,
    DATE_LIKE,
    DIGIT_GROUPS,
    FOREIGN,
    INDENT,
    NEAR_WINDOW,
    NON_DIGITS,
    NUMBER_LABELS,
    PHONE,
    PHONE_AFTER,
    REPRESENTATIVE,
    RRN,
    SEPARATOR_BYTES,
    TIMESTAMP,
    UNITS,
    VETO_WINDOW,
    Candidate,
)

_COMPANY_OR_CORPORATE = re.compile("|".join((*COMPANY, r"법\s?인")))


_SCANNED: dict[tuple[str, bool], dict] = {}  # (text before a number, whether a cell's) -> its cues (read only)


def forget() -> None:
    """Empty the memo of cues (for timing a run from cold)."""
    _SCANNED.clear()


def _scan(before: str, cell: bool) -> dict[str, tuple[str, int, int, str]]:
    """The last cue of each kind in before (see Context.cues), remembered for the next number after the same text."""
    found, n = {}, len(before)
    search, at = ALL_CUES.search, 0
    while (m := search(before, at)) is not None:
        start, at = m.span()
        hit = (m.group(), n - at, 0 if cell else n - start, before)
        for kind in kinds(hit[0]):
            found[kind] = hit
    if len(_SCANNED) >= 1 << 14:  # (a few MB at most)
        _SCANNED.clear()
    _SCANNED[before, cell] = found
    return found


class Context:
    """The text being searched and where each number's cues are (the text before it, or its table header)."""

    def __init__(self, text: str):
        if "<t" in text and ("<td" in text or "<th" in text or "<TD" in text):
            text = open_html_cells(text)
        self.text, self.structure, self.seen = text, None, {}
        if "\n" in text:  # (a table has two lines at least)
            structure = Structure(text)
            self.text = structure.text
            self.structure = structure if structure.rows else None

    def cues(self, pos: int) -> dict[str, tuple[str, int, int, str]]:
        """The last cue of each kind before the number at pos, found in one scan: kind -> (its text, its
        distance, how far back it starts, the text searched). The text searched is the ACC_WINDOW
        characters before pos, or in a table the number's column header and its own cell (where a cue
        counts however far back it starts)."""
        found = self.seen.get(pos)
        if found is None:
            before = self.structure.cell_before(self.text, pos) if self.structure else None
            cell = before is not None
            if not cell:
                before = self.text[max(pos - ACC_WINDOW, 0):pos]
                if "   " in before or "\n " in before:  # indentation is no distance: the window reads through it
                    before = INDENT.sub(" ", self.text[max(pos - 4 * ACC_WINDOW, 0):pos])[-ACC_WINDOW:]
            found = _SCANNED.get((before, cell))  # (the same text before a number recurs: labels, headers, forms)
            if found is None:
                found = _scan(before, cell)
            self.seen[pos] = found
        return found

    def judge(self, kind: str, pos: int, window: int, ignore: frozenset = frozenset()) -> tuple[int | None, bool]:
        """The distance from the last cue of a kind that starts within window characters before the number at
        pos (or None), and whether a not-PII word (order number, barcode...) is closer than that cue; ignore: the
        not-PII words whose numbers never have the shape judged."""
        found = self.seen.get(pos) or self.cues(pos)
        hit, veto = found.get(kind), found.get("veto")
        cue = None if hit is None or hit[2] > window else hit[1]
        return cue, veto is not None and veto[2] <= VETO_WINDOW and (cue is None or veto[1] < cue) \
            and veto[0] not in ignore

    def company_near(self, pos: int) -> bool:
        """Whether a company's name or 법인 stands in the window before the number at pos, however near its cue."""
        before = (self.seen.get(pos) or self.cues(pos)).get("rrn", ("", 0, 0, ""))[3]
        return _COMPANY_OR_CORPORATE.search(before) is not None

    def company(self, pos: int) -> bool:
        """Whether the not-PII word before the number at pos is a company's (주식회사, ㈜): that vetoes an RRN
        shape (a 법인등록번호) and not a phone number."""
        veto = (self.seen.get(pos) or self.cues(pos)).get("veto")
        return veto is not None and COMPANY_WORD.fullmatch(veto[0]) is not None

    def names_a_number(self, pos: int) -> bool:
        """Whether the not-PII word before the number at pos names it as another kind of number (주문번호, 회원 번호,
        order id, 고객번호, an ISBN), not just a subject nearby (회원 010-..., 택배 기사님 010-...)."""
        veto = (self.seen.get(pos) or self.cues(pos)).get("veto")
        if veto is None:
            return False
        word, before = veto[0], veto[3]
        after = before[len(before) - veto[1]:].lstrip()
        return word.endswith("번호") or word.isascii() or after.startswith(NUMBER_LABELS)


def _is_mobile(number: str) -> bool:
    """Whether a phone match is a mobile number (01X, or 1X after +82): no other number has its shape."""
    digits = number.encode().translate(None, SEPARATOR_BYTES)
    return digits.startswith((b"01", b"821", b"00821"))


def _account_cue(ctx: Context, start: int, end: int, number: str) -> int | None:
    """Distance to the account word or bank name before the number, 0 for a bank name just after it; None
    where it has none, or a not-PII word is nearer.

    A phone-shaped number (평생계좌) needs more than a bank that is also a city name: 부산 051-...
    is a phone number in Busan, and it is a phone if a phone word is nearer than the account cue.
    """
    cues = ctx.seen.get(start) or ctx.cues(start)
    found = cues.get("acc")
    if found is not None and (found[2] > ACC_WINDOW or COMPANY_BEFORE.search(found[3], 0, found[3].rfind(found[0]))):
        found = None  # (주식회사신한은행 names the bank as a company: its number is a 법인등록번호)
    shaped = None  # whether the number is phone-shaped, found out only where it counts
    cue = None
    if found is not None:
        if CITY.fullmatch(found[0]) is None or not (shaped := PHONE.fullmatch(number) is not None):
            cue = found[1]
    if cue is None and not (ctx.structure and ctx.structure.in_cell(start)):
        after = BANK_AFTER.match(ctx.text[end:end + 12])
        # (a phone-shaped number is a 평생계좌 only where a cue before says so: "010-1234-5678 신한" is a phone
        # number beside its bank)
        if after is not None and not (shaped if shaped is not None else (
                shaped := PHONE.fullmatch(number) is not None)):
            cue = 0
    if cue is None:
        return None
    if shaped is None:
        shaped = PHONE.fullmatch(number) is not None
    if shaped and "평생" not in (found[3] if found else ""):
        phone = cues.get("tel")
        if phone is not None and phone[2] <= ACC_WINDOW and phone[1] < cue:
            return None
    veto = cues.get("veto")
    return None if veto is not None and veto[2] <= VETO_WINDOW and veto[1] < cue else cue


def find_accounts(ctx: Context, a: int, b: int, found: list[Candidate]) -> None:
    search, end = DIGIT_GROUPS.search, a
    while (m := search(ctx.text, end, b)) is not None:
        start, end = m.span()
        if end - start < 10:  # fewer than 10 characters cannot hold 10 digits
            continue
        number = m.group()
        digits = end - start if number.isdigit() else len(number.encode().translate(None, SEPARATOR_BYTES))
        if not 10 <= digits <= 16 or digits == 10 and [len(g) for g in NON_DIGITS.split(number)] == [3, 2, 5]:
            continue  # (3-2-5 is a business registration number)
        if ". " in number or number[:2] in ("19", "20") and (DATE_LIKE.match(number) or TIMESTAMP.fullmatch(number)):
            continue  # "2016. 7. 23. 2013" is dates and 20021008011100 a time, not accounts
        text = ctx.text
        if text.startswith(":", end) and text[end + 1:end + 2].isdigit() \
                or start and COUNTRY_CODE_BEFORE.search(text, max(start - 12, 0), start):
            continue  # "20210922 10:38" is a date and a time, "+82 (0)64-9300-6443" a phone number
        cue = _account_cue(ctx, start, end, number)
        if cue is not None:
            found.append((3 if cue <= NEAR_WINDOW else 1, start, end, "acc"))


def find_rrns(ctx: Context, a: int, b: int, found: list[Candidate]) -> None:
    born, search, at = _births(), RRN.search, a
    while (m := search(ctx.text, at, b)) is not None:
        start, at = m.span()
        head = m.groups()
        if not (born[head] if head in born else _born(head, born)):
            continue
        cue, vetoed = ctx.judge("rrn", start, 20, NOT_RRN_SHAPED)
        if vetoed or cue is not None and ctx.seen[start]["rrn"][0] == "등록번호" and ctx.company_near(start):
            continue  # (a company's 등록번호 is its 법인등록번호)
        if cue is None:
            number = m.group()  # 1010101010110 is a pattern, not a person's; 880... a barcode
            if number.isdigit():
                if len(set(number)) <= 3 or _is_korean_ean13(number):
                    continue
            elif len(set(number.encode().translate(None, SEPARATOR_BYTES))) <= 3:
                continue
        found.append((4 if cue is not None else 2, start, at, "rrn"))


def _births() -> dict[tuple[str, str, str, str], bool]:
    """Today's memo of _born (a few thousand heads at most; the date arithmetic costs more than the rest of a
    number's checks)."""
    today = _today()
    if _heads[0] != today:
        _heads[:] = [today, {}]
    return _heads[1]


def _born(head: tuple[str, str, str, str], memo: dict) -> bool:
    """Whether YY, MM, DD and the sex digit of an RRN are a real birth date, not after today."""
    yy, mm, dd, s = map(int, head)
    try:
        born = datetime.date((1900 if s in (1, 2, 5, 6) else 2000) + yy, mm, dd) <= _heads[0]
    except ValueError:
        born = False
    memo[head] = born
    return born


_heads: list = [None, {}]  # (the day the memo holds for, head -> born)
_day: list = [0.0, None]  # (when today ends, today)


def _today() -> datetime.date:
    """datetime.date.today(), read again only after midnight (it costs more than the rest of a number's checks)."""
    now = time.time()
    if now >= _day[0]:
        today = datetime.date.today()
        tomorrow = datetime.datetime.combine(today + datetime.timedelta(days=1), datetime.time())
        _day[:] = [tomorrow.timestamp(), today]
    return _day[1]


def _is_korean_ean13(digits: str) -> bool:
    """A GS1 Korea barcode (880...) with a valid EAN-13 check digit."""
    if not digits.startswith("880"):
        return False
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(digits[:12]))
    return (10 - total % 10) % 10 == int(digits[12])


def find_phones(ctx: Context, a: int, b: int, found: list[Candidate]) -> None:
    text = ctx.text
    search, at = PHONE.search, a
    while (m := search(text, at, b)) is not None:
        start, at = m.span()
        cue, vetoed = ctx.judge("tel", start, 20, NOT_PHONE_SHAPED)
        if vetoed and not (_is_mobile(m.group()) and not ctx.names_a_number(start)) and not ctx.company(start):
            continue  # (a mobile number is vetoed only by a label that names it another number: 주문번호, order id;
            #            a company's name is no veto for its phone number)
        if m.group("intl82") and m.group().isdigit() and cue is None and PHONE_AFTER.match(text, at) is None:
            continue  # (821012345678 without a phone word may be an account or an id)
        if cue is None:  # a contiguous landline: a local number never starts with 0 or 1 (ids and codes do)
            plain, sep1, sep2 = m.group("plain", "sep1", "sep2")
            if plain and not sep1 and not sep2 and not plain.startswith("1") and m.group("mid")[0] in "01" \
                    and PHONE_AFTER.match(text, at) is None:
                continue
        found.append((2 + (cue is not None), start, at, "tel"))


def find_foreign(ctx: Context, a: int, b: int, found: list[Candidate]) -> None:
    """Numbers abroad (POLICY.md: they are tell too): +CC with 8 to 15 digits, and (816) 234-7724."""
    text = ctx.text
    search, end = FOREIGN.search, a
    while (m := search(text, end, b)) is not None:
        start, end = m.span()
        digits = len(m.group().encode().translate(None, SEPARATOR_BYTES))
        if (m.group()[0] == "(" or 8 <= digits <= 15) and not ctx.judge("tel", start, 20, NOT_PHONE_SHAPED)[1]:
            found.append((2, start, end, "tel"))


def find_representatives(ctx: Context, a: int, b: int, found: list[Candidate]) -> None:
    text = ctx.text
    search, end = REPRESENTATIVE.search, a
    while (m := search(text, end, b)) is not None:
        # 15XX-XXXX collides with year ranges, ISSNs and approval numbers: a phone word must be near.
        start, end = m.span()
        if text[start] != "1":  # a local number (3146-1316): only right after a phone word, and never a year range
            cue, vetoed = ctx.judge("tel", start, 6, NOT_PHONE_SHAPED)
            if cue is not None and not vetoed and text[start:start + 2] not in ("19", "20"):
                found.append((2, start, end, "tel"))
            continue
        cue, vetoed = ctx.judge("rep", start, 12, NOT_PHONE_SHAPED)
        if cue is None and PHONE_AFTER.match(text, end) is not None:
            cue = 0
        if cue is not None and not vetoed and not text.startswith(UNITS, end):
            found.append((2, start, end, "tel"))
