"""Source ``ddtp``: Debian package descriptions and their translations (DDTP).

Reads apt's ``Translation-<code>`` indexes from the private lists folder that ``fetch`` filled;
writes nothing. An English and a translated description with the same ``Description-md5`` are
aligned: the short descriptions always, and paragraphs, list items and sentences wherever both
sides split into the same number of them. Entry points: ``read_translations`` (one index) and
``extract_pairs`` (two of them aligned).
"""

import bz2
import gzip
import lzma
import os
import re

from corpus.fetch import run_tool, translation_files
from corpus.text import is_cjk, normalize_ws
from script_support import UserError

_BULLET = re.compile(r"^\s*(?:[-*+o\u2022]|\d+[.)])\s+")
_SENT_LATIN = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z\u00c0-\u00de\u0400-\u042f])")
_SENT_CJK = re.compile(r"(?<=[。！？])\s*|(?<=[.!?])\s+")


def read_index(path):
    """Return the text of an apt index file, whatever compression apt stored it with."""
    if path.endswith(".gz"):
        opener = gzip.open
    elif path.endswith((".xz", ".lzma")):
        opener = lzma.open
    elif path.endswith(".bz2"):
        opener = bz2.open
    elif path.endswith((".lz4", ".zst")):
        helper = "/usr/lib/apt/apt-helper"
        if not os.path.exists(helper):
            raise UserError("cannot read %s: apt-helper is missing" % path)
        return run_tool([helper, "cat-file", path], what="apt-helper cat-file")
    else:
        opener = open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def read_translations(lists_dir, code):
    """Return {Description-md5: (package, description text)} from all Translation-<code> files."""
    out = {}
    field = "description-%s" % code.lower()
    for path in translation_files(lists_dir, code):
        for stanza in read_index(path).split("\n\n"):
            pkg = md5 = desc = None
            lines = stanza.split("\n")
            for i, line in enumerate(lines):
                if line.startswith("Package:"):
                    pkg = line.split(":", 1)[1].strip()
                elif line.startswith("Description-md5:"):
                    md5 = line.split(":", 1)[1].strip()
                elif line.lower().startswith(field + ":"):
                    body = [line.split(":", 1)[1].strip()]
                    for cont in lines[i + 1:]:
                        if not cont.startswith((" ", "\t")):
                            break
                        body.append(cont)
                    desc = "\n".join(body)
            if md5 and desc:
                out.setdefault(md5, (pkg, desc))
    return out


def _join_lines(lines):
    """Join wrapped lines with a space, except between two CJK characters (ja/zh wrapping)."""
    out = ""
    for line in lines:
        if not line:
            continue
        if out and not (is_cjk(out[-1]) and is_cjk(line[0])):
            out += " "
        out += line
    return out


def description_segments(desc):
    """Split a Debian description into [short description, paragraph or list item, ...]."""
    lines = desc.split("\n")
    segs = [lines[0].strip()]
    cur = []
    for line in lines[1:]:
        body = line[1:] if line.startswith(" ") else line
        if body.strip() == ".":
            if cur:
                segs.append(_join_lines(cur))
                cur = []
        elif _BULLET.match(body):
            if cur:
                segs.append(_join_lines(cur))
            cur = [_BULLET.sub("", body).strip()]
        else:
            cur.append(body.strip())
    if cur:
        segs.append(_join_lines(cur))
    return [normalize_ws(s) for s in segs]


def split_sentences(text, lang):
    """Split at sentence ends (Latin/Cyrillic: before a capital; ja/zh: after 。！？)."""
    regex = _SENT_CJK if lang in ("ja", "zh") else _SENT_LATIN
    return [s for s in (x.strip() for x in regex.split(text)) if s]


def extract_pairs(en_desc, xx_desc, lang):
    """Yield (en, xx, origin) aligned between two ``read_translations`` dicts."""
    for md5 in sorted(set(en_desc) & set(xx_desc)):
        pkg, en_text = en_desc[md5]
        _, xx_text = xx_desc[md5]
        en_segs, xx_segs = description_segments(en_text), description_segments(xx_text)
        if len(en_segs) != len(xx_segs):
            en_segs, xx_segs = en_segs[:1], xx_segs[:1]
        for k, (en, xx) in enumerate(zip(en_segs, xx_segs)):
            if not en or not xx:
                continue
            en_s, xx_s = split_sentences(en, "en"), split_sentences(xx, lang)
            if k > 0 and len(en_s) == len(xx_s) and len(en_s) > 1:
                for j, (a, b) in enumerate(zip(en_s, xx_s)):
                    yield a, b, "%s:%d.%d" % (pkg, k, j)
            else:
                yield en, xx, "%s:%d" % (pkg, k)
