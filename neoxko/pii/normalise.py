"""What the PII rules read: text with every decimal digit made ASCII and the invisible characters taken out.

People and programs write the same number many ways: full-width `０１０`, Arabic-Indic `٠١٠`, mathematical
`𝟎𝟏𝟎` digits (every character `str.isdecimal` accepts), look-alike dashes and dots, and zero-width or
soft-hyphen characters that a copy from a web page or a word processor leaves between digits. The rules see
one form; the spans they find are mapped back to the characters of the original text, so a replacement
covers what was written, invisible characters inside the number included.
"""

import re
import unicodedata

# Characters that show nothing: zero-width space, joiners, word joiner, BOM, soft hyphen, bidi marks
INVISIBLE = "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063" \
            "\u2064\u2066\u2067\u2068\u2069\ufeff"
LOOK_ALIKES = {
    "\uff0d": "-", "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
    "\u2212": "-", "\ufe63": "-", "\u3161": "-", "\u1173": "-",  # ㅡ typed as a dash (and its NFKC form)
    "\uff0e": ".", "\u00b7": ".", "\u2027": ".", "\u30fb": ".", "\uff65": ".",  # dots and middle dots
    "\uff08": "(", "\uff09": ")", "\uff0b": "+", "\u3000": " ", "\xa0": " ", "\u2002": " ", "\u2003": " ",
    "\u2009": " ", "\u202f": " ",
}


def _decimals() -> dict[int, str]:
    """Every non-ASCII decimal digit -> its ASCII digit (the last block of digits ends before U+1FC00)."""
    return {cp: str(unicodedata.decimal(chr(cp))) for cp in range(0x80, 0x1FC00) if chr(cp).isdecimal()}


DECIMALS = _decimals()
_FOLD = str.maketrans({**DECIMALS, **LOOK_ALIKES})


def _char_class(codepoints) -> str:
    """A regex character class of the code points, as ranges."""
    points, ranges = sorted(codepoints), []
    for cp in points:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "[" + "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges) + "]"


# Other digits and invisible characters: the text is normalised whole (any character beyond the BMP takes that path
# too: a class with the astral digit blocks one by one costs ten times as much per character as the BMP bitmap)
NEEDS_NORMALISING = re.compile(_char_class([c for c in (*DECIMALS, *map(ord, INVISIBLE)) if c < 0x10000])[:-1]
                               + "\U00010000-\U0010ffff]")
# A digit, or a character that needs normalising: a text without one holds no PII (the one scan most text gets)
DIGIT_OR_NEEDS_NORMALISING = re.compile("[0-9" + NEEDS_NORMALISING.pattern[1:])
# A look-alike dash, dot, bracket or space next to a digit (or one space away): only those are folded, in place
_LOOK = _char_class(map(ord, LOOK_ALIKES))
LOOK_ALIKE = re.compile(_LOOK)  # (searched first: a class alone is scanned several times faster than the pair)
LOOK_ALIKE_NEAR_DIGIT = re.compile(f"[0-9][ ]?{_LOOK}|{_LOOK}[ ]?[0-9]")
FOLD_LOOK_ALIKES = str.maketrans(LOOK_ALIKES)
ANY_DIGIT = re.compile(_char_class([*range(0x30, 0x3A), *DECIMALS]))
_INVISIBLE = re.compile(f"[{INVISIBLE}]")


class Normalised:
    """text as the rules read it (.text), and the way back to the original's offsets (.original)."""

    __slots__ = ("text", "kept")

    def __init__(self, text: str):
        folded = text.translate(_FOLD)
        self.kept: list[int] | None = None  # where each character of .text stands in the original
        if _INVISIBLE.search(folded):
            self.kept = [i for i, char in enumerate(folded) if char not in INVISIBLE]
            folded = _INVISIBLE.sub("", folded)
        self.text = folded

    def original(self, start: int, end: int) -> tuple[int, int]:
        """The original offsets of .text[start:end] (what lies inside it is inside the span)."""
        if self.kept is None:
            return start, end
        return self.kept[start], self.kept[end - 1] + 1
