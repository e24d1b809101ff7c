"""Korean PII replacement: resident registration, phone and bank account numbers -> <|rrn|>, <|tel|>, <|acc|>.

Shapes narrow the candidates, context decides (../shared/pii/FORMATS.md and POLICY.md):
- rrn: YYMMDD + [1-8] + 6 digits with a real birth date, in any separator; checksums are not
  required (numbers issued since 2020-10-05 have none); barcode, order and corporate contexts veto.
- tel: Korean dialable numbers (mobile, 02, regional, 070, 050X, 080, 060, +82 forms, bracketed
  area codes), representative 15XX/16XX/18XX numbers only next to a phone word.
- acc: 10-16 digits in any grouping, only with an account word or a bank name before (or a bank
  name just after); a phone-shaped number right after an account cue is an account (평생계좌).
Digits are matched with explicit look-arounds, never \\b, which fails next to Hangul.
"""

import bisect
import datetime
import itertools
import operator
import re
import time
from collections import Counter
from typing import NamedTuple

from neoxko.pii.context import Structure, open_html_cells, open_keys
from neoxko.pii.cues import ALL_CUES, BANK, COMPANY, CUE_KINDS, kinds
from neoxko.pii.normalise import (
    ANY_DIGIT,
    DIGIT_OR_NEEDS_NORMALISING,
    FOLD_LOOK_ALIKES,
    LOOK_ALIKE,
    LOOK_ALIKE_NEAR_DIGIT,
    NEEDS_NORMALISING,
    Normalised,
)

TOKENS = {"rrn": "<|rrn|>", "tel": "<|tel|>", "acc": "<|acc|>"}

_SEP = r"(?:[ ]?[-.][ ]?|[ ])"  # one separator: dash or dot (spaces around allowed), or one space
# In a phone number, two spaces too (scans, hand-aligned forms); not in other numbers, where two spaces part the
# columns of an aligned table
_PSEP = r"(?:[ ]{0,2}[-.][ ]{0,2}|[ ]{1,2})"
_OPT = rf"{_SEP}?"
_POPT = rf"{_PSEP}?"
# Not inside a number, a code like DWG-02-..., a URL or an e-mail address. Checked after a number's first
# character (each look-behind one character wider), so that every shape below opens with a literal or a
# class and re jumps from possible start to possible start instead of trying every position.
_START = r"(?<![0-9].)(?<![A-Za-z]-.)(?<![0-9][-.].)(?<![/=#?&_@].)"
# (A comma ends a number: "01012345678,950417-1234567" is a CSV row; thousands groups are never 8 digits.)
_END = r"(?![0-9])(?!-[A-Za-z0-9])(?!\.[0-9])(?![/_@])(?!\.[A-Za-z])"

_IN_NUMBER = r"(?<![0-9].)(?<![A-Za-z]-.)(?<![0-9][-.].)"  # the start's checks without the URL and e-mail ones
_MOBILE_END = r"(?![0-9])(?!-[A-Za-z0-9])(?!\.[0-9])(?!@)"  # (an e-mail address is an address)
_RRN = re.compile(rf"([0-9]{_START}[0-9])(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])(?:[ ]{{0,3}}[-.][ ]{{0,3}}|[ ])?"
                  rf"([1-8])[0-9]{{6}}{_END}")
_AREA = r"(?:2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70|50[2-8]|80|60|1[016789])"
_INTL = _POPT + r"(?:\(0\)[ ]?)?(?P<NAME>" + _AREA + r")" + _POPT  # after 82: the area code without its 0
_PHONE = re.compile(
    r"(?:\+" + _IN_NUMBER + r"[ ]?82" + _INTL.replace("NAME", "intl")  # +82 10-... (in a URL too: wa.me/+82...)
    + r"|0" + _START + r"082" + _INTL.replace("NAME", "intl00")  # 0082 10-...
    # 82-10-..., 82-2-...; 821012345678 (then a phone word must be near)
    + r"|8" + _START + r"(?=2[ ]{0,2}[-.][ ]{0,2}[1-7]|21[016789][0-9]{8}(?![0-9]))2" + _INTL.replace("NAME", "intl82")
    + r"|\(" + _START + r"0" + _AREA + r"\)[ ]?"  # (02) 123-4567
    + r"|0" + _START + _AREA + r"\)[ ]?"  # 02) 123-4567
    + r"|0" + _START + r"(?P<plain>" + _AREA + r")" + r"(?P<sep1>" + _POPT + r")"  # 02-123-4567
    # a mobile number is one in a URL and after = or _ too (recall first: nothing else has its shape)
    + r"|0" + _IN_NUMBER + r"(?P<mobile>1[016789])" + _POPT + r")"
    + r"(?P<mid>[0-9]{3,4})(?P<sep2>" + _POPT + r")[0-9]{4}(?(mobile)" + _MOBILE_END + "|" + _END + ")"
)
# Abroad: a bracketed North American area code, or + and a country code other than 82, then digit groups
_FOREIGN = re.compile(r"\((?<![0-9A-Za-z].)[2-9][0-9]{2}[ ]?\)[ ]?[2-9][0-9]{2}[ ]?[-.][ ]?[0-9]{4}(?![0-9])"
                      r"|\+(?<![0-9A-Za-z].)(?!82)[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}(?![0-9])")
# Nationwide representative numbers (15XX/16XX/18XX-XXXX), and local numbers written without their area code
_REPRESENTATIVE = re.compile("[1-9]" + _START + r"(?:(?<=1)[568][0-9]{2}(?P<sep>" + _POPT + r")"
                             r"|(?<=[2-9])[0-9]{3}[ ]?-[ ]?)[0-9]{4}" + _END)
_DIGIT_GROUPS = re.compile("[0-9]" + _START + r"[0-9]{0,15}(?:" + _SEP + r"[0-9]{1,9}){0,4}" + _END)

# A phone word just after the number: "1577-1389에 전화", "02-123-4567 로 연락", "(1588-0000)으로 문의"
_PHONE_AFTER = re.compile(r"[)\]]?[ ]?(?:번|번호)?(?:으로|로|에|에서|을|를|와|과|,)?[ ]?"
                          r"(?:전화|연락|문자|팩스|문의|상담|통화|콜|신고)")
_COMPANY = re.compile("|".join(COMPANY))
_INDENT = re.compile(r"\s*\n\s*|[ ]{3,}")
_COMPANY_BEFORE = re.compile(rf"(?:{'|'.join(COMPANY)})[ ]?$")
_COUNTRY_CODE_BEFORE = re.compile(r"(?:\+[ ]?|00)?82[ ]?[-.]?[ ]?(?:\(0\)[ ]?)?$")
# After a range of years, amounts or counts: not a phone number
_UNITS = ("년", "원", "만", "천", "억", "명", "개", "%", "~", "회", "건", "km", "kg")
_NUMBER_LABELS = ("번호", "No", "no", "#", "ID", "id", "Id", "코드")
_CITY = re.compile(r"\s*(?:부산|대구|광주|경남|전북|제주)\s*")
_BANK_AFTER = re.compile(rf"^[ (]{{0,3}}{BANK}")  # (in the same cell: not after a tab or a comma)
# A 14-digit timestamp (POLICY.md); twelve digits that read as a date and a time may be an account
_TIMESTAMP = re.compile(r"(?:19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])(?:[01][0-9]|2[0-3])[0-5][0-9]"
                        r"[0-5][0-9]")
_DATE_LIKE = re.compile(
    r"(?:19|20)[0-9]{2}[ ]?[-.][ ]?(?:0?[1-9]|1[0-2])[ ]?[-.][ ]?(?:0?[1-9]|[12][0-9]|3[01])(?![0-9])")

_NON_DIGITS = re.compile("[^0-9]+")
_DIGITS, _DIGIT_RUN = frozenset("0123456789"), re.compile("[0-9]*")
_SEPARATOR_BYTES = b"-. ()+"  # a candidate's bytes without them: its digits (bytes.translate is fast, str's is not)
# Digits with short separators between, from a digit that starts a run (a match never starts later) and only
# where 8 characters could hold 8 digits: re runs through digit groups, not digit by digit; _windows counts them
_CANDIDATE = re.compile(r"[0-9](?<![0-9].)(?=[-. ()+0-9]{7})[0-9]*+(?:[-. ()+]{1,5}+[0-9]++)*+")
_ACC_WINDOW, _NEAR_WINDOW, _VETO_WINDOW = 24, 14, 16
_Candidate = tuple[int, int, int, str]  # (confidence, start, end, label)


class Span(NamedTuple):
    start: int
    end: int
    label: str  # "rrn", "tel" or "acc"


def find_pii(text: str) -> list[Span]:
    """The PII spans of text, sorted and non-overlapping."""
    first = DIGIT_OR_NEEDS_NORMALISING.search(text)
    if first is None:  # most text has no digit: nothing to find
        return []
    if NEEDS_NORMALISING.search(text, first.start()):  # other digits, invisible characters: the rare path
        if not ANY_DIGIT.search(text):
            return []
        normalised = Normalised(text)
        spans = _find(normalised.text)
        if normalised.kept is None:
            return spans
        new = tuple.__new__
        return [new(Span, (*normalised.original(s.start, s.end), s.label)) for s in spans]
    look = LOOK_ALIKE.search(text)  # "010–1234–5678", "010·1234·5678": fold them (the same length)
    if look is not None and LOOK_ALIKE_NEAR_DIGIT.search(text, max(look.start() - 2, 0)):
        return _find(text.translate(FOLD_LOOK_ALIKES))
    return _find(text)


def _find(folded: str) -> list[Span]:
    windows = _windows(folded)
    if not windows:
        return []
    ctx = _Context(open_keys(folded))
    # Most text has no account word or bank name anywhere: then it holds no account (the cheap test first)
    accounts = CUE_KINDS["acc"].search(ctx.text) is not None
    found: list[_Candidate] = []
    abroad = "(" in folded or "+" in folded
    for a, b, digits, shapes in windows:  # accounts, RRNs, phones: the order ties are broken in (never overlapping)
        if accounts and digits >= 10:
            _accounts(ctx, a, b, found)
        if shapes & _MAY_RRN:
            _rrns(ctx, a, b, found)
        if shapes & _MAY_PHONE:
            _phones(ctx, a, b, found)
            if abroad:
                _foreign(ctx, a, b, found)
        if shapes & _MAY_REPRESENTATIVE:
            _representatives(ctx, a, b, found)
    return _resolve(found)


# Which rules a number allows (a match lies within one number and starts one of its digit groups): a phone starts
# with 0 or 8 (82-..., +82), a representative number holds a dash, an RRN has 13 digits.
_MAY_PHONE, _MAY_REPRESENTATIVE, _MAY_RRN = 1, 2, 4


def _windows(text: str) -> list[tuple[int, int, int, int]]:
    """The pre-scan: (start, end, digits, shapes) around the numbers of 8 or more digits that are not dates, the
    only places the rules look, and which rules can match there. Windows never overlap, nor end inside a number."""
    windows: list[tuple[int, int, int, int]] = []
    size, search, end = len(text), _CANDIDATE.search, 0
    while (m := search(text, end)) is not None:  # (a search loop costs less than finditer's iterator)
        start, end = m.span()
        number = m.group()
        if number.isdigit():
            digits = end - start
            # (one group: the RRN is all of it; a representative number 8 digits from 1)
            shapes = (number[0] in "08") | (digits == 8 and number[0] == "1") << 1 | (digits == 13) << 2
        else:
            digits = len(number.encode().translate(None, _SEPARATOR_BYTES))
            shapes = _shapes(_NON_DIGITS.split(number), "+" in number or "(" in number or
                             start and text[start - 1] in "(+") if digits >= 8 else 0
        if digits < 8 or digits == 8 and number[0] in "12" and _DATE_LIKE.fullmatch(number):  # (a date: 8 at most)
            continue
        a, b = start - 4 if start > 4 else 0, end + 4
        if b < size and text[b - 1] in _DIGITS:  # not inside the next number: after it
            b = min(_DIGIT_RUN.match(text, b - 1).end() + 1, size)  # type: ignore[union-attr]
        if windows and a <= windows[-1][1]:
            last = windows[-1]
            windows[-1] = (last[0], b, digits if digits > last[2] else last[2], last[3] | shapes)
        else:
            windows.append((a, b, digits, shapes))
    return windows


def _shapes(groups: list[str], bracket_or_plus: bool) -> int:
    """Which rules can match a number of several digit groups: a phone starts a group with 0 or 8 (82-...) or
    has a + or a bracket; a representative or local number is a 4-digit group and a 4-digit group (or 8 digits
    from 15, 16 or 18); an RRN is 13 digits or 6 and 7."""
    shapes = _MAY_PHONE if bracket_or_plus else 0
    last = ""
    for group in groups:
        first, n = group[:1], len(group)
        if first == "0" or first == "8":
            shapes |= _MAY_PHONE
        if n == 4 and len(last) == 4 and last[0] != "0" or n == 8 and group[:2] in ("15", "16", "18"):
            shapes |= _MAY_REPRESENTATIVE
        if n == 13 or n == 7 and len(last) == 6:
            shapes |= _MAY_RRN
        last = group
    return shapes


def replace_pii(text: str, context: str = "") -> str:
    """text with each resident registration, phone and account number replaced by its token."""
    return replace_pii_counted(text, context)[0]


def replace_pii_counted(text: str, context: str = "") -> tuple[str, Counter]:
    """replace_pii, and how many values of each label were replaced. context is read before text, for its cues
    (the header line of the table that text continues), and is not part of what comes back."""
    if context:
        shift = len(context) + 1
        new = tuple.__new__
        spans = [new(Span, (s.start - shift, s.end - shift, s.label))
                 for s in find_pii(context + "\n" + text) if s.start >= shift]
    else:
        spans = find_pii(text)
    return apply_spans(text, spans)


def apply_spans(text: str, spans: list[Span]) -> tuple[str, Counter]:
    """text with the spans (sorted, disjoint) replaced by their tokens, and the count of each label."""
    if not spans:
        return text, Counter()
    parts, last = [], 0
    for span in spans:
        parts += [text[last:span.start], TOKENS[span.label]]
        last = span.end
    parts.append(text[last:])
    return "".join(parts), Counter(s.label for s in spans)


class _Context:
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
        distance, how far back it starts, the text searched). The text searched is the _ACC_WINDOW
        characters before pos, or in a table the number's column header and its own cell (where a cue
        counts however far back it starts)."""
        found = self.seen.get(pos)
        if found is None:
            before = self.structure.cell_before(self.text, pos) if self.structure else None
            cell = before is not None
            if not cell:
                before = self.text[max(pos - _ACC_WINDOW, 0):pos]
                if "   " in before or "\n " in before:  # indentation is no distance: the window reads through it
                    before = _INDENT.sub(" ", self.text[max(pos - 4 * _ACC_WINDOW, 0):pos])[-_ACC_WINDOW:]
            elif before in self.seen:  # a column's header and an empty cell prefix: the same for every row
                found = self.seen[pos] = self.seen[before]
                return found
            found, n = {}, len(before)
            search, at = ALL_CUES.search, 0
            while (m := search(before, at)) is not None:
                start, at = m.span()
                hit = (m.group(), n - at, 0 if cell else n - start, before)
                for kind in kinds(hit[0]):
                    found[kind] = hit
            self.seen[pos] = found
            if cell:
                self.seen[before] = found
        return found

    def judge(self, kind: str, pos: int, window: int) -> tuple[int | None, bool]:
        """The distance from the last cue of a kind that starts within window characters before the number at
        pos (or None), and whether a not-PII word (order number, barcode...) is closer than that cue."""
        found = self.seen.get(pos) or self.cues(pos)
        hit, veto = found.get(kind), found.get("veto")
        cue = None if hit is None or hit[2] > window else hit[1]
        return cue, veto is not None and veto[2] <= _VETO_WINDOW and (cue is None or veto[1] < cue)

    def company(self, pos: int) -> bool:
        """Whether the not-PII word before the number at pos is a company's (주식회사, ㈜): that vetoes an RRN
        shape (a 법인등록번호) and not a phone number."""
        veto = (self.seen.get(pos) or self.cues(pos)).get("veto")
        return veto is not None and _COMPANY.fullmatch(veto[0]) is not None

    def names_a_number(self, pos: int) -> bool:
        """Whether the not-PII word before the number at pos names it as another kind of number (주문번호, 회원 번호,
        order id, 고객번호, an ISBN), not just a subject nearby (회원 010-..., 택배 기사님 010-...)."""
        veto = (self.seen.get(pos) or self.cues(pos)).get("veto")
        if veto is None:
            return False
        word, before = veto[0], veto[3]
        after = before[len(before) - veto[1]:].lstrip()
        return word.endswith("번호") or word.isascii() or after.startswith(_NUMBER_LABELS)


def _is_mobile(number: str) -> bool:
    """Whether a phone match is a mobile number (01X, or 1X after +82): no other number has its shape."""
    digits = number.encode().translate(None, _SEPARATOR_BYTES)
    return digits.startswith((b"01", b"821", b"00821"))


def _account_cue(ctx: _Context, start: int, end: int, number: str) -> int | None:
    """Distance to the account word or bank name before the number, 0 for a bank name just after it; None
    where it has none, or a not-PII word is nearer.

    A phone-shaped number (평생계좌) needs more than a bank that is also a city name: 부산 051-...
    is a phone number in Busan, and it is a phone if a phone word is nearer than the account cue.
    """
    cues = ctx.seen.get(start) or ctx.cues(start)
    found = cues.get("acc")
    if found is not None and (found[2] > _ACC_WINDOW or _COMPANY_BEFORE.search(found[3], 0, found[3].rfind(found[0]))):
        found = None  # (주식회사신한은행 names the bank as a company: its number is a 법인등록번호)
    shaped = None  # whether the number is phone-shaped, found out only where it counts
    cue = None
    if found is not None:
        if _CITY.fullmatch(found[0]) is None or not (shaped := _PHONE.fullmatch(number) is not None):
            cue = found[1]
    if cue is None and not (ctx.structure and ctx.structure.in_cell(start)):
        after = _BANK_AFTER.match(ctx.text[end:end + 12])
        # (a phone-shaped number is a 평생계좌 only where a cue before says so: "010-1234-5678 신한" is a phone
        # number beside its bank)
        if after is not None and not (shaped if shaped is not None else (
                shaped := _PHONE.fullmatch(number) is not None)):
            cue = 0
    if cue is None:
        return None
    if shaped is None:
        shaped = _PHONE.fullmatch(number) is not None
    if shaped and "평생" not in (found[3] if found else ""):
        phone = cues.get("tel")
        if phone is not None and phone[2] <= _ACC_WINDOW and phone[1] < cue:
            return None
    veto = cues.get("veto")
    return None if veto is not None and veto[2] <= _VETO_WINDOW and veto[1] < cue else cue


def _accounts(ctx: _Context, a: int, b: int, found: list[_Candidate]) -> None:
    search, end = _DIGIT_GROUPS.search, a
    while (m := search(ctx.text, end, b)) is not None:
        start, end = m.span()
        if end - start < 10:  # fewer than 10 characters cannot hold 10 digits
            continue
        number = m.group()
        digits = end - start if number.isdigit() else len(number.encode().translate(None, _SEPARATOR_BYTES))
        if not 10 <= digits <= 16 or digits == 10 and [len(g) for g in _NON_DIGITS.split(number)] == [3, 2, 5]:
            continue  # (3-2-5 is a business registration number)
        if ". " in number or number[:2] in ("19", "20") and (_DATE_LIKE.match(number) or _TIMESTAMP.fullmatch(number)):
            continue  # "2016. 7. 23. 2013" is dates and 20021008011100 a time, not accounts
        text = ctx.text
        if text.startswith(":", end) and text[end + 1:end + 2].isdigit() \
                or start and _COUNTRY_CODE_BEFORE.search(text, max(start - 12, 0), start):
            continue  # "20210922 10:38" is a date and a time, "+82 (0)64-9300-6443" a phone number
        cue = _account_cue(ctx, start, end, number)
        if cue is not None:
            found.append((3 if cue <= _NEAR_WINDOW else 1, start, end, "acc"))


def _rrns(ctx: _Context, a: int, b: int, found: list[_Candidate]) -> None:
    born, search, at = _births(), _RRN.search, a
    while (m := search(ctx.text, at, b)) is not None:
        start, at = m.span()
        head = m.groups()
        if not (born[head] if head in born else _born(head, born)):
            continue
        cue, vetoed = ctx.judge("rrn", start, 20)
        if vetoed:
            continue
        if cue is None:
            number = m.group()  # 1010101010110 is a pattern, not a person's; 880... a barcode
            if number.isdigit():
                if len(set(number)) <= 3 or _is_korean_ean13(number):
                    continue
            elif len(set(number.encode().translate(None, _SEPARATOR_BYTES))) <= 3:
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


def _phones(ctx: _Context, a: int, b: int, found: list[_Candidate]) -> None:
    text = ctx.text
    search, at = _PHONE.search, a
    while (m := search(text, at, b)) is not None:
        start, at = m.span()
        cue, vetoed = ctx.judge("tel", start, 20)
        if vetoed and not (_is_mobile(m.group()) and not ctx.names_a_number(start)) and not ctx.company(start):
            continue  # (a mobile number is vetoed only by a label that names it another number: 주문번호, order id;
            #            a company's name is no veto for its phone number)
        if m.group("intl82") and m.group().isdigit() and cue is None and _PHONE_AFTER.match(text, at) is None:
            continue  # (821012345678 without a phone word may be an account or an id)
        if cue is None:  # a contiguous landline: a local number never starts with 0 or 1 (ids and codes do)
            plain, sep1, sep2 = m.group("plain", "sep1", "sep2")
            if plain and not sep1 and not sep2 and not plain.startswith("1") and m.group("mid")[0] in "01" \
                    and _PHONE_AFTER.match(text, at) is None:
                continue
        found.append((2 + (cue is not None), start, at, "tel"))


def _foreign(ctx: _Context, a: int, b: int, found: list[_Candidate]) -> None:
    """Numbers abroad (POLICY.md: they are tell too): +CC with 8 to 15 digits, and (816) 234-7724."""
    text = ctx.text
    search, end = _FOREIGN.search, a
    while (m := search(text, end, b)) is not None:
        start, end = m.span()
        digits = len(m.group().encode().translate(None, _SEPARATOR_BYTES))
        if (m.group()[0] == "(" or 8 <= digits <= 15) and not ctx.judge("tel", start, 20)[1]:
            found.append((2, start, end, "tel"))


def _representatives(ctx: _Context, a: int, b: int, found: list[_Candidate]) -> None:
    text = ctx.text
    search, end = _REPRESENTATIVE.search, a
    while (m := search(text, end, b)) is not None:
        # 15XX-XXXX collides with year ranges, ISSNs and approval numbers: a phone word must be near.
        start, end = m.span()
        if text[start] != "1":  # a local number (3146-1316): only right after a phone word, and never a year range
            cue, vetoed = ctx.judge("tel", start, 6)
            if cue is not None and not vetoed and text[start:start + 2] not in ("19", "20"):
                found.append((2, start, end, "tel"))
            continue
        cue, vetoed = ctx.judge("rep", start, 12)
        if cue is None and _PHONE_AFTER.match(text, end) is not None:
            cue = 0
        if cue is not None and not vetoed and not text.startswith(_UNITS, end):
            found.append((2, start, end, "tel"))


_START_OF = operator.itemgetter(1)


def _resolve(candidates: list[_Candidate]) -> list[Span]:
    """Keep the most confident of overlapping candidates (ties: the longer span, then the earlier one)."""
    new = tuple.__new__  # (a NamedTuple's own constructor costs more than the rest of this function)
    if len(candidates) <= 1:  # (most lines)
        return [new(Span, candidates[0][1:])] if candidates else []
    by_start = sorted(candidates, key=_START_OF)
    if all(a[2] <= b[1] for a, b in itertools.pairwise(by_start)):  # nothing overlaps: keep them all
        return [new(Span, c[1:]) for c in by_start]
    chosen: list[tuple[int, int, str]] = []  # disjoint, by start (a bisect finds the one a candidate may overlap)
    starts: list[int] = []
    for _, start, end, label in sorted(candidates, key=lambda c: (-c[0], c[1] - c[2], c[1])):
        i = bisect.bisect_left(starts, end)  # chosen[:i] start before this one ends: only chosen[i - 1] may reach in
        if i == 0 or chosen[i - 1][1] <= start:
            chosen.insert(i, (start, end, label))
            starts.insert(i, start)
    return [new(Span, c) for c in chosen]
