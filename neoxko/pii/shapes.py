"""What a number looks like: the separators people type, the shapes of RRNs, phone numbers (here and abroad),
representative numbers and accounts as regexes, and the pre-scan that finds the numbers of a text and which of
those shapes each may hold. The rules (rules.py) decide which of the shapes found are PII.

Digits are matched with explicit look-arounds, never \\b, which fails next to Hangul. Every shape opens with a
literal or a class, its look-behinds checked after its first character, so re jumps from possible start to
possible start instead of trying every position.
"""

import re

from neoxko.pii.cues import BANK, COMPANY

SEP = r"(?:[ ]?[-.][ ]?|[ ])"  # one separator: dash or dot (spaces around allowed), or one space
# In a phone number, two spaces too (scans, hand-aligned forms); not in other numbers, where two spaces part the
# columns of an aligned table
PSEP = r"(?:[ ]{0,2}[-.][ ]{0,2}|[ ]{1,2})"
OPT = rf"{SEP}?"
POPT = rf"{PSEP}?"
# Not inside a number, a code like DWG-02-..., a URL or an e-mail address. Checked after a number's first
# character (each look-behind one character wider), so that every shape below opens with a literal or a
# class and re jumps from possible start to possible start instead of trying every position.
START = r"(?<![0-9].)(?<![A-Za-z]-.)(?<![0-9][-.].)(?<![/=#?&_@].)"
# (A comma ends a number: "01012345678,950417-1234567" is a CSV row; thousands groups are never 8 digits.)
END = r"(?![0-9])(?!-[A-Za-z0-9])(?!\.[0-9])(?![/_@])(?!\.[A-Za-z])"

IN_NUMBER = r"(?<![0-9].)(?<![A-Za-z]-.)(?<![0-9][-.].)"  # the start's checks without the URL and e-mail ones
MOBILE_END = r"(?![0-9])(?!-[A-Za-z0-9])(?!\.[0-9])(?!@)"  # (an e-mail address is an address)
RRN = re.compile(rf"([0-9]{START}[0-9])(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])(?:[ ]{{0,3}}[-.][ ]{{0,3}}|[ ])?"
                  rf"([1-8])[0-9]{{6}}{END}")
AREA = r"(?:2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70|50[2-8]|80|60|1[016789])"
INTL = POPT + r"(?:\(0\)[ ]?)?(?P<NAME>" + AREA + r")" + POPT  # after 82: the area code without its 0
PHONE = re.compile(
    r"(?:\+" + IN_NUMBER + r"[ ]?82" + INTL.replace("NAME", "intl")  # +82 10-... (in a URL too: wa.me/+82...)
    + r"|0" + START + r"082" + INTL.replace("NAME", "intl00")  # 0082 10-...
    # 82-10-..., 82-2-...; 821012345678 (then a phone word must be near)
    + r"|8" + START + r"(?=2[ ]{0,2}[-.][ ]{0,2}[1-7]|21[016789][0-9]{8}(?![0-9]))2" + INTL.replace("NAME", "intl82")
    + r"|\(" + START + r"0" + AREA + r"\)[ ]?"  # (02) 123-4567
    + r"|0" + START + AREA + r"\)[ ]?"  # 02) 123-4567
    + r"|0" + START + r"(?P<plain>" + AREA + r")" + r"(?P<sep1>" + POPT + r")"  # 02-123-4567
    # a mobile number is one in a URL and after = or _ too (recall first: nothing else has its shape)
    + r"|0" + IN_NUMBER + r"(?P<mobile>1[016789])" + POPT + r")"
    + r"(?P<mid>[0-9]{3,4})(?P<sep2>" + POPT + r")[0-9]{4}(?(mobile)" + MOBILE_END + "|" + END + ")"
)
# Abroad: a bracketed North American area code, or + and a country code other than 82, then digit groups
FOREIGN = re.compile(r"\((?<![0-9A-Za-z].)[2-9][0-9]{2}[ ]?\)[ ]?[2-9][0-9]{2}[ ]?[-.][ ]?[0-9]{4}(?![0-9])"
                      r"|\+(?<![0-9A-Za-z].)(?!82)[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}(?![0-9])")
# Nationwide representative numbers (15XX/16XX/18XX-XXXX), and local numbers written without their area code
REPRESENTATIVE = re.compile("[1-9]" + START + r"(?:(?<=1)[568][0-9]{2}(?P<sep>" + POPT + r")"
                             r"|(?<=[2-9])[0-9]{3}[ ]?-[ ]?)[0-9]{4}" + END)
DIGIT_GROUPS = re.compile("[0-9]" + START + r"[0-9]{0,15}(?:" + SEP + r"[0-9]{1,9}){0,4}" + END)

# A phone word just after the number: "1577-1389에 전화", "02-123-4567 로 연락", "(1588-0000)으로 문의"
PHONE_AFTER = re.compile(r"[)\]]?[ ]?(?:번|번호)?(?:으로|로|에|에서|을|를|와|과|,)?[ ]?"
                          r"(?:전화|연락|문자|팩스|문의|상담|통화|콜|신고)")
COMPANY_WORD = re.compile("|".join(COMPANY))
INDENT = re.compile(r"\s*\n\s*|[ ]{3,}")
COMPANY_BEFORE = re.compile(rf"(?:{'|'.join(COMPANY)})[ ]?$")
COUNTRY_CODE_BEFORE = re.compile(r"(?:\+[ ]?|00)?82[ ]?[-.]?[ ]?(?:\(0\)[ ]?)?$")
# After a range of years, amounts or counts: not a phone number
UNITS = ("년", "원", "만", "천", "억", "명", "개", "%", "~", "회", "건", "km", "kg")
NUMBER_LABELS = ("번호", "No", "no", "#", "ID", "id", "Id", "코드")
CITY = re.compile(r"\s*(?:부산|대구|광주|경남|전북|제주)\s*")
BANK_AFTER = re.compile(rf"^[ (]{{0,3}}{BANK}")  # (in the same cell: not after a tab or a comma)
# A 14-digit timestamp (POLICY.md); twelve digits that read as a date and a time may be an account
TIMESTAMP = re.compile(r"(?:19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])(?:[01][0-9]|2[0-3])[0-5][0-9]"
                        r"[0-5][0-9]")
DATE_LIKE = re.compile(
    r"(?:19|20)[0-9]{2}[ ]?[-.][ ]?(?:0?[1-9]|1[0-2])[ ]?[-.][ ]?(?:0?[1-9]|[12][0-9]|3[01])(?![0-9])")

NON_DIGITS = re.compile("[^0-9]+")
DIGITS, DIGIT_RUN = frozenset("0123456789"), re.compile("[0-9]*")
SEPARATOR_BYTES = b"-. ()+"  # a candidate's bytes without them: its digits (bytes.translate is fast, str's is not)
# Digits with short separators between, from a digit that starts a run (a match never starts later) and only
# where 8 characters could hold 8 digits: re runs through digit groups, not digit by digit; number_windows counts them
CANDIDATE = re.compile(r"[0-9](?<![0-9].)(?=[-. ()+0-9]{7})[0-9]*+(?:[-. ()+]{1,5}+[0-9]++)*+")
ACC_WINDOW, NEAR_WINDOW, VETO_WINDOW = 24, 14, 16
Candidate = tuple[int, int, int, str]  # (confidence, start, end, label)


# Which rules a number allows (a match lies within one number and starts one of its digit groups): group_shapes
# says which, from the groups' first digits and lengths.
MAY_PHONE, MAY_REPRESENTATIVE, MAY_RRN = 1, 2, 4


def number_windows(text: str) -> list[tuple[int, int, int, int]]:
    """The pre-scan: (start, end, digits, shapes) around the numbers of 8 or more digits that are not dates, the
    only places the rules look, and which rules can match there. Windows never overlap, nor end inside a number."""
    windows: list[tuple[int, int, int, int]] = []
    size, search, end = len(text), CANDIDATE.search, 0
    while (m := search(text, end)) is not None:  # (a search loop costs less than finditer's iterator)
        start, end = m.span()
        number = m.group()
        if number.isdigit():
            digits = end - start
            # (one group: the RRN is all of it; a representative number 8 digits from 1)
            shapes = (number[0] in "08") | (digits == 8 and number[0] == "1") << 1 | (digits == 13) << 2
        else:
            digits = len(number.encode().translate(None, SEPARATOR_BYTES))
            shapes = group_shapes(NON_DIGITS.split(number), "+" in number or "(" in number or
                             start and text[start - 1] in "(+") if digits >= 8 else 0
        if digits < 8 or digits == 8 and number[0] in "12" and DATE_LIKE.fullmatch(number):  # (a date: 8 at most)
            continue
        a, b = start - 4 if start > 4 else 0, end + 4
        if b < size and text[b - 1] in DIGITS:  # not inside the next number: after it
            b = min(DIGIT_RUN.match(text, b - 1).end() + 1, size)  # type: ignore[union-attr]
        if windows and a <= windows[-1][1]:
            last = windows[-1]
            windows[-1] = (last[0], b, digits if digits > last[2] else last[2], last[3] | shapes)
        else:
            windows.append((a, b, digits, shapes))
    return windows


def group_shapes(groups: list[str], bracket_or_plus: bool) -> int:
    """Which rules can match a number of several digit groups: a phone starts a group with 0 or 8 (82-...) or
    has a + or a bracket; a representative or local number is a 4-digit group and a 4-digit group (or 8 digits
    from 15, 16 or 18); an RRN is 13 digits or 6 and 7."""
    shapes = MAY_PHONE if bracket_or_plus else 0
    last = ""
    for group in groups:
        first, n = group[:1], len(group)
        if first == "0" or first == "8":
            shapes |= MAY_PHONE
        if n == 4 and len(last) == 4 and last[0] != "0" or n == 8 and group[:2] in ("15", "16", "18"):
            shapes |= MAY_REPRESENTATIVE
        if n == 13 or n == 7 and len(last) == 6:
            shapes |= MAY_RRN
        last = group
    return shapes
