"""Step 3, clean: the cleaning rules and de-duplication of the candidate pairs.

Reads ``OUT/pairs/<source>.en-<xx>.tsv``; writes nothing (the split step writes the result).
Each pair is normalised (UI accelerators ``~ _ &`` and ``(D)`` markers removed, ``%PRODUCTNAME``
-> ``LibreOffice``, NFC and whitespace) and dropped, with the reason counted, when it is empty,
has too many or mismatched placeholders, is too long, has too few English words or no letters, is
untranslated (target equals source), is not in the target's script (ru, ja, zh), has a non-English
source side, or has an implausible length ratio. Exact duplicates are dropped; a pair found in
several sources counts for the first of them (help, ui, ddtp). Entry point: ``clean_corpus``.
"""

import collections
import re

from corpus.sources import pairs_path, read_pairs
from corpus.text import CYRILLIC, HAN, KANA, normalize_ws
from script_support import log

_MARKER = re.compile(r"\s*[(（]\s*[_~&]?[A-Za-z0-9]\s*[)）](?=\s*(?:\.\.\.|[…:：?？!！。])?\s*$)")
_MARKER_CJK = re.compile(r"(?<=[^\x00-\x7f])\s*[(（][_~&]?[A-Za-z0-9][)）]")  # 下一步(N) >
_UNDERSCORE = re.compile(r"(?<!_)_(?=[^\W_])")
_AMPERSAND = re.compile(r"&(?=[^\W\d_])(?![A-Za-z]+;)")
PLACEHOLDER = re.compile(
    r"%[A-Z][A-Z0-9_]+%?"            # %PRODUCTNAME, %FILENAME%
    r"|%\d+\$?[a-z]?"                # %1, %1$s
    r"|%[-+ #0]*\d*(?:\.\d+)?[hlLqjzt]*[sdiuxXfFeEgGcp]"  # printf
    r"|\$\([A-Za-z0-9_]+\)"          # $(ARG1)
    r"|\$[A-Za-z_][A-Za-z0-9_]*\$"   # $name$
    r"|\$\d+"                        # $1
    r"|\{[A-Za-z0-9_]*\}"            # {0}
    r"|</?[a-zA-Z][^<>]*>"           # markup
    r"|#\d+\b")                      # #1

# (min, max) of (len(xx) + 10) / (len(en) + 10), measured in characters
RATIO_LIMITS = {"de": (0.5, 2.2), "fr": (0.5, 2.2), "es": (0.5, 2.2), "it": (0.5, 2.2), "ru": (0.5, 2.2),
                "ja": (0.2, 1.4), "zh": (0.15, 1.2)}


def strip_ui_markup(text):
    """Remove accelerator markers from a UI string: (_D)-style suffixes, ~, mnemonic _ and &."""
    text = _MARKER.sub("", text)
    text = _MARKER_CJK.sub("", text)
    text = text.replace("~", "")
    text = _UNDERSCORE.sub("", text)
    text = _AMPERSAND.sub("", text)
    return text


def script_ok(text, lang):
    """True if ``text`` is plausibly written in ``lang``'s script (checked for ru, ja, zh)."""
    letters = sum(1 for c in text if c.isalpha())
    if lang == "ru":
        n = len(CYRILLIC.findall(text))
    elif lang == "ja":
        n = len(HAN.findall(text)) + len(KANA.findall(text))
    elif lang == "zh":
        if KANA.search(text):
            return False
        n = len(HAN.findall(text))
    else:
        return True
    return n > 0 and n >= 0.2 * letters


def clean_pair(en, xx, lang, source, options, reasons):
    """Return a cleaned (en, xx) or None, counting the reason for dropping in ``reasons``.

    ``options`` has ``max_placeholders``, ``max_chars`` and ``min_words`` (build_corpus.py's
    options of the same names)."""
    if source == "ui":
        en, xx = strip_ui_markup(en), strip_ui_markup(xx)
    en = en.replace("%PRODUCTNAME", "LibreOffice")
    xx = xx.replace("%PRODUCTNAME", "LibreOffice")
    en, xx = normalize_ws(en), normalize_ws(xx)
    if not en or not xx:
        reasons["empty"] += 1
        return None
    ph_en, ph_xx = PLACEHOLDER.findall(en), PLACEHOLDER.findall(xx)
    if ph_en or ph_xx:
        if len(ph_en) > options.max_placeholders or sorted(ph_en) != sorted(ph_xx):
            reasons["placeholders"] += 1
            return None
    if len(en) > options.max_chars or len(xx) > options.max_chars:
        reasons["too_long"] += 1
        return None
    if len(PLACEHOLDER.sub(" ", en).split()) < options.min_words:
        reasons["too_few_words"] += 1
        return None
    if not any(c.isalpha() for c in en) or not any(c.isalpha() for c in xx):
        reasons["no_letters"] += 1
        return None
    if en.casefold() == xx.casefold():
        reasons["untranslated"] += 1
        return None
    if not script_ok(xx, lang):
        reasons["wrong_script"] += 1
        return None
    if CYRILLIC.search(en) or HAN.search(en) or KANA.search(en):
        reasons["non_english_source"] += 1
        return None
    lo, hi = RATIO_LIMITS[lang]
    ratio = (len(xx) + 10.0) / (len(en) + 10.0)
    if not lo <= ratio <= hi:
        reasons["length_ratio"] += 1
        return None
    return en, xx


def clean_corpus(out, langs, sources, options):
    """Clean and de-duplicate every pairs file. Return (clean, dropped, candidates):
    ``clean[lang]`` maps each unique (en, xx) to its source, in first-seen order;
    ``dropped["en-xx"][source][reason]`` and ``candidates["en-xx"][source]`` are counts."""
    clean, dropped, candidates = {}, {}, {}
    for lang in langs:
        pairs = collections.OrderedDict()
        for source in sources:
            reasons = collections.Counter()
            n = 0
            for en, xx, _origin in read_pairs(pairs_path(out, source, lang)):
                n += 1
                cp = clean_pair(en, xx, lang, source, options, reasons)
                if cp is None:
                    continue
                if cp in pairs:
                    reasons["duplicate"] += 1
                else:
                    pairs[cp] = source
            dropped.setdefault("en-" + lang, {})[source] = dict(sorted(reasons.items()))
            candidates.setdefault("en-" + lang, {})[source] = n
        clean[lang] = pairs
        log("[clean] en-%s: %d unique pairs (%s)" % (
            lang, len(pairs), ", ".join("%s %d" % (s, c) for s, c in
                                        sorted(collections.Counter(pairs.values()).items()))))
    return clean, dropped, candidates
