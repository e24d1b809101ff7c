"""The cue words of the PII rules (neoxko.pii.replace): bank names, account, phone, RRN and service words, and the
words that veto a number (POLICY.md), built so that re scans them fast.

Every alternative opens with a literal character and they are compiled grouped by it: re jumps to the places
a cue can start and tries only the cues that start with the character there, several times faster than a long
flat alternation. All kinds are found in one scan (ALL_CUES); kinds() says which kinds a matched word is.
"""

import functools
import re

BANK_NAMES = (
    "KEB하나", "하나", "국민", "KB", "신한", "우리", "NH", "농협", "단위농협", "지역농협", "기업", "IBK", "SC제일", "제일",
    "씨티", "시티", "카카오뱅크", "카뱅", "카카오", "토스뱅크", "토스", "케이뱅크", "K뱅크", "우체국", "새마을금고", "새마을",
    "MG", "신협", "수협", "Sh", "부산", "BNK", "대구", "DGB", "iM뱅크", "경남", "광주", "전북", "제주", "산업", "KDB", "외환",
    "뱅크오브아메리카", "HSBC",
)
_BANKS = "|".join(BANK_NAMES) + r"|[가-힣A-Za-z]{1,6}은행|[가-힣]{1,4}銀"  # and the banks not in the list
# A bank name must end its word: 국민 in 국민신문고 or 하나 in 하나의 is not a bank.
_BANK_TAIL = r"(?:은행|銀|중앙회|회원조합)?(?![가-힣])"
BANK = rf"(?:{_BANKS})+{_BANK_TAIL}"


def _cues(*alternatives: str, words: tuple[str, ...] = (), names: tuple[str, ...] = ()) -> list[str]:
    """The alternatives of a cue-word regex, each opening with a literal character. words: English words in
    lower, Title or UPPER case, standing on their own; names: the same, inside other words too."""
    def cases(word: str) -> list[str]:
        return list(dict.fromkeys((word, word.title(), word.upper())))
    alone = [f"{w[0]}(?<![A-Za-z].){w[1:]}(?![A-Za-z])" for word in words for w in cases(word)]
    return [*alternatives, *alone, *(w for name in names for w in cases(name))]


def compile_cues(alternatives: list[str], flags: int = 0) -> re.Pattern:
    """One regex for the alternatives, grouped by their first character (order kept within a group, so it
    matches what the plain alternation matches): re then jumps to the places a cue can start and tries only
    the cues that start with the character there, several times faster than a long flat alternation."""
    groups: dict[str, list[str]] = {}
    for alternative in alternatives:
        if alternative[0] == "\\" and alternative[1] in "()[].?*+^$|{":  # an escaped literal first: \(주\)
            alternative = alternative[1:]
        else:
            assert alternative[0] not in "\\()[].?*+^$|{", alternative  # a literal character first
        groups.setdefault(alternative[0], []).append(alternative[1:])
    return re.compile("|".join(f"{re.escape(first)}(?:{'|'.join(rests)})" for first, rests in groups.items()), flags)


_ACCOUNT_WORDS = (
    "계좌", r"계\s좌", "입금(?!자)", "송금", "이체", "예금주", "통장", "환불", r"보내실\s?곳", r"받는\s?계좌", r"마음\s?전하실\s?곳", "축의금",
    "조의금", "부조금", "회비", "후원", "가상계좌", "모임통장", "평생계좌", "무통장", "환급",
)
# A listed bank (NH농협 too), or any word that ends in 은행 or 銀 (the cue's end is what counts)
_ACC_BEFORE = _cues(*_ACCOUNT_WORDS, *(name + rf"(?:{_BANKS})*{_BANK_TAIL}" for name in (*BANK_NAMES, "은행", "銀")),
                    names=("account", "acct", "bank"))
_PHONE_CUES = (
    "전화", "연락", "휴대", "핸드폰", "폰", "HP", r"H\.P", "Mobile", "Phone", "Fax", "FAX", "팩스", "☎", "☏", "📞", "문의",
    "상담", "전송", "발신", "수신", "회신", "대표번호", "고객센터", "콜센터", "직통", "안심번호", "문자", "카톡", "기사님", "사무실", "회사", "자택", "직장",
    r"T\.", r"F\.", r"T\)", r"내\s?번호", r"제\s?번호", r"저의\s?번호", r"나의\s?번호",
)
_PHONE_KEYS = (
    "msisdn", "mobile", "phone", "caller", "callee", "sender", "receiver", "contact", "cell", "hp", "to", "from",
    "fax", "callback",
)
_PHONE_WORDS = _cues(*_PHONE_CUES, words=_PHONE_KEYS, names=("tel",))
# Representative numbers (15XX-XXXX) come after service words as well
_REPRESENTATIVE_WORDS = _cues(*_PHONE_CUES, "예약", "예매", "변경", "취소", "견적", "접수", "안내", "주문", "신고", "배달",
                              "택시", "콜", "센터", words=_PHONE_KEYS,
                              names=("tel", "center", "support", "hotline", "helpdesk"))
_RRN_WORDS = _cues("주민", r"주\s민", "외국인", "등(?<!법인등)(?<!사업자등)(?<!차량등)록번호", names=("rrn", "jumin", "resident", "ssn"))
# Numbers of these kinds share the shapes above and are not PII (POLICY.md).
_NOT_PII = (
    "사업자", "법인", "주문", "송장", "운송장", "택배", "승인", "바코드", "회원", "고객번호", "ISBN", "ISSN", "DOI", "특허",
    "고유번호", r"예약\s?번호", "카드", "학번", "수험", "지로", "납부", "모델", "시리얼", "일련", "내선", "국번", "코드", "EAN",
    "GTIN", r"법\s인", *(COMPANY := ("주식회사", "㈜", r"\(주\)", "유한회사", "재단법인", "사단법인")),
)
# (and the keys of machine text that name other numbers: orders.id, invoice_no, tracking)
_NOT_PII_KEYS = _cues(names=("order", "invoice", "tracking", "serial", "sku", "barcode", "coupon", "ticket", "booking",
                             "reservation", "approval", "isbn", "issn", "gtin", "item", "product", "goods", "code",
                             "model", "customer", "member", "client", "epoch", "timestamp", "corp", "date"),
                      words=("ean", "ts", "cust"))
# Not-PII words whose numbers never have a shape: they do not veto it (a 사업자등록번호 is 3-2-5 digits, not an RRN;
# a parcel service or a card company has a phone number)
NOT_RRN_SHAPED = frozenset(("사업자", "승인", "송장", "운송장", "택배", "ISSN", "ISBN", "DOI", "특허", "학번", "수험", "지로",
                            "납부", "내선", "국번", "카드"))
NOT_PHONE_SHAPED = frozenset(("사업자", "법인", "택배", "카드", "바코드", "EAN", "GTIN", "ISBN", "DOI", "특허", "학번", "수험",
                              "지로", "납부"))
CUE_KINDS = {kind: compile_cues(words) for kind, words in (
    ("veto", [*_NOT_PII, *_NOT_PII_KEYS]), ("rrn", _RRN_WORDS), ("acc", _ACC_BEFORE), ("tel", _PHONE_WORDS),
    ("rep", _REPRESENTATIVE_WORDS),
)}
# Every kind in one scan; the not-PII words first, so that 예약번호 is a veto and not the service word 예약
ALL_CUES = compile_cues([*_NOT_PII, *_NOT_PII_KEYS, *_RRN_WORDS, *_ACC_BEFORE, *_PHONE_WORDS, *_REPRESENTATIVE_WORDS])


@functools.lru_cache(maxsize=4096)
def kinds(cue: str) -> tuple[str, ...]:
    """The kinds a cue word is (주문 is a service word and a not-PII word)."""
    return tuple(kind for kind, pattern in CUE_KINDS.items() if pattern.fullmatch(cue))
