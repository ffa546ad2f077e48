"""Text rules shared by the extraction and cleaning steps: Unicode and whitespace normalisation,
and the character classes that tell scripts apart (Cyrillic, Han, kana). Reads and writes nothing."""

import re
import unicodedata

CYRILLIC = re.compile(r"[\u0400-\u04ff]")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")

_DROP_CHARS = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"), None)


def normalize_ws(text):
    """NFC, drop zero-width characters and soft hyphens, collapse all whitespace to one space."""
    text = unicodedata.normalize("NFC", text).translate(_DROP_CHARS)
    return " ".join(text.split())


def is_cjk(ch):
    """True for a Han or kana character, CJK punctuation or a full-width form."""
    return (bool(HAN.match(ch) or KANA.match(ch)) or "\u3000" <= ch <= "\u303f"
            or "\uff00" <= ch <= "\uffef")
