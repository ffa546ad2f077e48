#!/usr/bin/env python3
"""Build an English <-> {de, fr, es, ru, ja, zh} corpus of human translations from Debian packages.

Sources (all fetched with ``apt-get`` and unpacked with ``dpkg-deb -x``; nothing else is needed):

* ``help``: LibreOffice offline help, ``libreoffice-help-{en-us,de,fr,es,ru,ja,zh-cn}`` (MPL-2.0).
  The same HTML files exist for every language under ``usr/share/libreoffice/help/<lang>/text/``;
  paragraphs carry shared ``id="par_id..."`` attributes, so (file path, id) aligns them exactly.
* ``ui``: LibreOffice interface catalogs, ``libreoffice-l10n-{de,fr,es,ru,ja,zh-cn}`` (MPL-2.0):
  gettext ``.mo`` files under ``usr/lib/libreoffice/program/resource/<ll>/LC_MESSAGES/``;
  msgid (English) -> msgstr.
* ``ddtp``: Debian package-description translations (each under its package's licence), apt's
  ``Translation-<lang>`` indexes fetched with ``apt-get update`` into a private lists folder
  (the system's own lists are not touched) and matched on ``Description-md5``.

Pipeline (each stage is skipped when its outputs exist; ``--force`` redoes stages 3-4,
``--refresh-downloads`` also stages 1-2):

1. ``apt-get update`` into ``CACHE/apt-lists`` (private ``Dir::State::Lists``).
2. ``apt-get download`` of the LibreOffice packages into ``CACHE/debs``, ``dpkg-deb -x`` into
   ``CACHE/extract``.
3. Candidate pairs per source and language -> ``OUT/pairs/<source>.en-<xx>.tsv``.
4. Cleaning (accelerators, ``(D)`` markers, placeholders, untranslated entries, script check,
   length and ratio limits), de-duplication, a multi-way valid/test set (the same English
   sentences translated into every language, LibreOffice sources only), and a split decided by a
   hash of the normalised English side, so no English valid/test sentence is in any training
   file.  Writes ``OUT/raw/{train,valid,test}.en-<xx>.{en,<xx>}`` (parallel lines),
   ``OUT/meta/<split>.en-<xx>.source`` (the source of every line) and ``OUT/manifest.json``.
5. ``binarize.py``: one shared SentencePiece model and ``fairseq-preprocess`` into ``OUT/bin``
   (``--bin`` moves it, ``--no-binarize`` stops after stage 4), with ``OUT/bin/binarize.json``
   (tool versions, counts, checksums).

Example (everything, about 2 minutes on 2 cores)::

    python examples/data/build_corpus.py --out /tmp/taskmoe_corpus
    fairseq-train /tmp/taskmoe_corpus/bin --user-dir taskmoe_fairseq ...
"""

import argparse
import collections
import datetime
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata

import binarize  # noqa: E402  (sibling module)
from script_support import UserError, atomic_write_bytes, run_main, sha256_file  # noqa: E402

ALL_LANGS = ("de", "fr", "es", "ru", "ja", "zh")
SOURCES = ("help", "ui", "ddtp")
LIBREOFFICE_SOURCES = ("help", "ui")
SPLITS = ("train", "valid", "test")

# language code -> (help package suffix / help folder, l10n package suffix / resource folder, DDTP code)
LANG_INFO = {
    "en": {"help_pkg": "libreoffice-help-en-us", "help_dir": "en-US", "ddtp": "en"},
    "de": {"help_pkg": "libreoffice-help-de", "help_dir": "de", "ui_pkg": "libreoffice-l10n-de",
           "ui_dir": "de", "ddtp": "de"},
    "fr": {"help_pkg": "libreoffice-help-fr", "help_dir": "fr", "ui_pkg": "libreoffice-l10n-fr",
           "ui_dir": "fr", "ddtp": "fr"},
    "es": {"help_pkg": "libreoffice-help-es", "help_dir": "es", "ui_pkg": "libreoffice-l10n-es",
           "ui_dir": "es", "ddtp": "es"},
    "ru": {"help_pkg": "libreoffice-help-ru", "help_dir": "ru", "ui_pkg": "libreoffice-l10n-ru",
           "ui_dir": "ru", "ddtp": "ru"},
    "ja": {"help_pkg": "libreoffice-help-ja", "help_dir": "ja", "ui_pkg": "libreoffice-l10n-ja",
           "ui_dir": "ja", "ddtp": "ja"},
    "zh": {"help_pkg": "libreoffice-help-zh-cn", "help_dir": "zh-CN",
           "ui_pkg": "libreoffice-l10n-zh-cn", "ui_dir": "zh_CN", "ddtp": "zh_CN"},
}

HELP_ROOT = "usr/share/libreoffice/help"
UI_ROOT = "usr/lib/libreoffice/program/resource"


def log(msg):
    """Print a progress line (flushed, so it interleaves correctly with subprocess output)."""
    print(msg, flush=True)


# ----------------------------------------------------------------------------- small file helpers


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_lines(path, lines):
    """Write one line per item (each item must not contain a newline)."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def run(cmd, cwd=None, what=None):
    """Run a command; on failure raise UserError with the last line of its stderr."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, errors="replace")
    except FileNotFoundError:
        raise UserError("command not found: %s" % cmd[0])
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        errs = [l for l in lines if l.startswith("E:")] or lines
        detail = errs[-1] if errs else "exit status %d" % proc.returncode
        raise UserError("%s failed: %s" % (what or " ".join(cmd[:2]), detail))
    return proc.stdout


def check_tools():
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UserError("'%s' not found on PATH: this script needs a Debian-style system "
                            "with apt and dpkg" % tool)


# ----------------------------------------------------------------------------- apt: lists, downloads


def apt_options(lists_dir):
    """apt options that keep apt's state in a private lists folder and touch no system cache."""
    opts = ["-o", "Dir::State::Lists=" + lists_dir,
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Acquire::GzipIndexes=false"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # as root apt would drop to the _apt user, which cannot write into our private folders
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def apt_update(cache, langs, force):
    """Fetch package lists and Translation-* indexes into CACHE/apt-lists (private)."""
    lists_dir = os.path.join(cache, "apt-lists")
    stamp = os.path.join(lists_dir, "complete.json")
    want = ["en"] + [LANG_INFO[l]["ddtp"] for l in langs]
    if not force and os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            have = json.load(f).get("languages", [])
        if set(want) <= set(have):
            log("[lists] reusing %s" % lists_dir)
            return lists_dir
    os.makedirs(os.path.join(lists_dir, "partial"), exist_ok=True)
    log("[lists] apt-get update into private folder %s (languages %s)" % (lists_dir, ",".join(want)))
    t = time.time()
    run(["apt-get", "update", "-q"] + apt_options(lists_dir)
        + ["-o", "Acquire::Languages=" + ",".join(want)], what="apt-get update")
    names = os.listdir(lists_dir)
    if not any("_Packages" in n for n in names):
        raise UserError("apt-get update fetched no package lists into %s (no network access to "
                        "the Debian mirror?)" % lists_dir)
    missing = [code for code in want if not translation_files(lists_dir, code)]
    if "en" in missing:
        raise UserError("apt-get update fetched no Translation-en index (no network access?)")
    for code in missing:
        log("[lists] warning: no Translation-%s index was fetched" % code)
    atomic_write_text(stamp, json.dumps({"languages": want,
                                         "date": datetime.datetime.utcnow().isoformat() + "Z"}))
    log("[lists] done in %.1fs" % (time.time() - t))
    return lists_dir


def deb_field(deb, field):
    return run(["dpkg-deb", "-f", deb, field], what="dpkg-deb -f").strip()


def download(pkg, cache, lists_dir, force):
    """Return the path of PKG's .deb in CACHE/debs, downloading it with apt-get if needed."""
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(debs, glob.escape(pkg) + "_*.deb")))
    if existing and not force:
        return existing[-1]
    tmp = tempfile.mkdtemp(dir=debs, prefix=".tmp-" + pkg + ".")
    try:
        try:
            run(["apt-get", "download", "-q"] + apt_options(lists_dir) + [pkg], cwd=tmp,
                what="apt-get download")
        except UserError as e:
            raise UserError("could not download package '%s' (%s)" % (pkg, e))
        got = glob.glob(os.path.join(tmp, "*.deb"))
        if len(got) != 1:
            raise UserError("could not download package '%s' (no .deb was written)" % pkg)
        for old in existing:
            os.unlink(old)
        dest = os.path.join(debs, os.path.basename(got[0]))
        os.replace(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract(deb, cache, force):
    """Unpack a .deb with dpkg-deb -x into CACHE/extract/<name>_<version>; return that folder."""
    name = os.path.basename(deb)[:-len(".deb")]
    dest = os.path.join(cache, "extract", name)
    if os.path.isdir(dest) and not force:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".tmp-" + name + ".")
    try:
        run(["dpkg-deb", "-x", deb, tmp], what="dpkg-deb -x %s" % os.path.basename(deb))
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_packages(pkgs, cache, lists_dir, force):
    """Download and unpack every package; return {pkg: {"version", "deb", "sha256", "dir"}}."""
    info = {}
    for i, pkg in enumerate(pkgs, 1):
        deb = download(pkg, cache, lists_dir, force)
        folder = extract(deb, cache, force)
        info[pkg] = {"version": deb_field(deb, "Version"), "deb": os.path.basename(deb),
                     "size": os.path.getsize(deb), "sha256": sha256_file(deb), "dir": folder}
        log("[debs] %2d/%d %s %s (%.1f MB)" % (i, len(pkgs), pkg, info[pkg]["version"],
                                               info[pkg]["size"] / 1e6))
    return info


# ----------------------------------------------------------------------------- text normalisation

_DROP_CHARS = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"), None)


def normalize_ws(text):
    """NFC, drop zero-width characters and soft hyphens, collapse all whitespace to one space."""
    text = unicodedata.normalize("NFC", text).translate(_DROP_CHARS)
    return " ".join(text.split())


# ----------------------------------------------------------------------------- source: help


class _ParagraphParser(html.parser.HTMLParser):
    """Collects the text of elements whose id starts with ``par_id``.

    Text inside elements with a ``hidden`` attribute (e.g. the macOS variant of a menu path) and
    inside script/style is skipped; code paragraphs are skipped altogether.
    """

    VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
    SKIP_CLASSES = frozenset("code codeintable bascode pycode smathcode image imageintable "
                             "youtube_consent".split())

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []
        self.hidden_depth = None
        self.current = None  # (id, depth, parts)
        self.paragraphs = collections.OrderedDict()

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag == "br" and self.current is not None:
                self.current[2].append(" ")
            return
        self.stack.append(tag)
        depth = len(self.stack)
        attrs = dict(attrs)
        if self.hidden_depth is None and ("hidden" in attrs or tag in ("script", "style")):
            self.hidden_depth = depth
        if self.current is None and (attrs.get("id") or "").startswith("par_id"):
            classes = set((attrs.get("class") or "").split())
            if not classes & self.SKIP_CLASSES:
                self.current = (attrs["id"], depth, [])

    def handle_startendtag(self, tag, attrs):
        if tag == "br" and self.current is not None:
            self.current[2].append(" ")

    def handle_endtag(self, tag):
        if tag in self.VOID or tag not in self.stack:
            return
        while self.stack:
            depth = len(self.stack)
            popped = self.stack.pop()
            if self.hidden_depth is not None and depth <= self.hidden_depth:
                self.hidden_depth = None
            if self.current is not None and depth <= self.current[1]:
                pid, _, parts = self.current
                self.paragraphs.setdefault(pid, []).append(normalize_ws("".join(parts)))
                self.current = None
            if popped == tag:
                break

    def handle_data(self, data):
        if self.current is not None and self.hidden_depth is None:
            self.current[2].append(data)


def parse_help_file(path):
    """Return {par_id: [text, ...]} for one help HTML file."""
    parser = _ParagraphParser()
    with open(path, encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    parser.close()
    return parser.paragraphs


def help_files(lang_dir):
    root = os.path.join(lang_dir, "text")
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".html"):
                out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


def extract_help(en_dir, xx_dir):
    """Yield (en, xx, origin) for every par_id shared by the same file in both languages."""
    for rel in help_files(en_dir):
        xx_path = os.path.join(xx_dir, "text", rel)
        if not os.path.exists(xx_path):
            continue
        en_pars = parse_help_file(os.path.join(en_dir, "text", rel))
        xx_pars = parse_help_file(xx_path)
        for pid, en_texts in en_pars.items():
            xx_texts = xx_pars.get(pid)
            if not xx_texts or len(xx_texts) != len(en_texts):
                continue
            for en, xx in zip(en_texts, xx_texts):
                if en and xx:
                    yield en, xx, "%s#%s" % (rel, pid)


# ----------------------------------------------------------------------------- source: ui


def read_mo(path):
    """Yield (context, msgid, msgstr) of a gettext .mo file; plural entries are skipped."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 20:
        return
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x950412DE:
        endian = "<"
    elif magic == 0xDE120495:
        endian = ">"
    else:
        raise UserError("not a gettext .mo file: %s" % path)
    n, o_orig, o_trans = struct.unpack(endian + "3I", data[8:20])
    for i in range(n):
        ln, off = struct.unpack(endian + "2I", data[o_orig + 8 * i:o_orig + 8 * i + 8])
        msgid = data[off:off + ln]
        ln, off = struct.unpack(endian + "2I", data[o_trans + 8 * i:o_trans + 8 * i + 8])
        msgstr = data[off:off + ln]
        if not msgid or b"\x00" in msgid or b"\x00" in msgstr:
            continue  # header or plural forms
        try:
            msgid = msgid.decode("utf-8")
            msgstr = msgstr.decode("utf-8")
        except UnicodeDecodeError:
            continue
        ctx = ""
        if "\x04" in msgid:
            ctx, msgid = msgid.split("\x04", 1)
        yield ctx, msgid, msgstr


def extract_ui(ui_dir):
    """Yield (en, xx, origin) from every .mo catalog in ui_dir."""
    for path in sorted(glob.glob(os.path.join(ui_dir, "LC_MESSAGES", "*.mo"))):
        catalog = os.path.basename(path)[:-3]
        for ctx, msgid, msgstr in read_mo(path):
            en, xx = normalize_ws(msgid), normalize_ws(msgstr)
            if en and xx:
                yield en, xx, "%s:%s" % (catalog, ctx)


# ----------------------------------------------------------------------------- source: ddtp


def read_index(path):
    """Return the text of an apt index file, whatever compression apt stored it with."""
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    if path.endswith((".xz", ".lzma")):
        import lzma
        with lzma.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    if path.endswith(".bz2"):
        import bz2
        with bz2.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    if path.endswith((".lz4", ".zst")):
        helper = "/usr/lib/apt/apt-helper"
        if not os.path.exists(helper):
            raise UserError("cannot read %s: apt-helper is missing" % path)
        return run([helper, "cat-file", path], what="apt-helper cat-file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def translation_files(lists_dir, code):
    pattern = re.compile(r"_i18n_Translation-%s(\.[a-z0-9]+)?$" % re.escape(code.replace("_", "%5f")),
                         re.IGNORECASE)
    return sorted(os.path.join(lists_dir, n) for n in os.listdir(lists_dir) if pattern.search(n))


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


_BULLET = re.compile(r"^\s*(?:[-*+o\u2022]|\d+[.)])\s+")
_SENT_LATIN = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z\u00c0-\u00de\u0400-\u042f])")
_SENT_CJK = re.compile(r"(?<=[。！？])\s*|(?<=[.!?])\s+")


def _is_cjk(ch):
    return bool(_HAN.match(ch) or _KANA.match(ch)) or "\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uffef"


def _join_lines(lines):
    """Join wrapped lines with a space, except between two CJK characters (ja/zh wrapping)."""
    out = ""
    for line in lines:
        if not line:
            continue
        if out and not (_is_cjk(out[-1]) and _is_cjk(line[0])):
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
    regex = _SENT_CJK if lang in ("ja", "zh") else _SENT_LATIN
    return [s for s in (x.strip() for x in regex.split(text)) if s]


def extract_ddtp(en_desc, xx_desc, lang):
    """Yield (en, xx, origin) aligned between two description dicts keyed by Description-md5."""
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


# ----------------------------------------------------------------------------- cleaning

_MARKER = re.compile(r"\s*[(（]\s*[_~&]?[A-Za-z0-9]\s*[)）](?=\s*(?:\.\.\.|[…:：?？!！。])?\s*$)")
_MARKER_CJK = re.compile(r"(?<=[^\x00-\x7f])\s*[(（][_~&]?[A-Za-z0-9][)）]")  # 下一步(N) >
_UNDERSCORE = re.compile(r"(?<!_)_(?=[^\W_])")
_AMPERSAND = re.compile(r"&(?=[^\W\d_])(?![A-Za-z]+;)")
_PLACEHOLDER = re.compile(
    r"%[A-Z][A-Z0-9_]+%?"            # %PRODUCTNAME, %FILENAME%
    r"|%\d+\$?[a-z]?"                # %1, %1$s
    r"|%[-+ #0]*\d*(?:\.\d+)?[hlLqjzt]*[sdiuxXfFeEgGcp]"  # printf
    r"|\$\([A-Za-z0-9_]+\)"          # $(ARG1)
    r"|\$[A-Za-z_][A-Za-z0-9_]*\$"   # $name$
    r"|\$\d+"                        # $1
    r"|\{[A-Za-z0-9_]*\}"            # {0}
    r"|</?[a-zA-Z][^<>]*>"           # markup
    r"|#\d+\b")                      # #1
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")

# (min, max) of (len(xx) + 10) / (len(en) + 10), measured in characters
RATIO_LIMITS = {"de": (0.5, 2.2), "fr": (0.5, 2.2), "es": (0.5, 2.2), "ru": (0.5, 2.2),
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
        n = len(_CYRILLIC.findall(text))
    elif lang == "ja":
        n = len(_HAN.findall(text)) + len(_KANA.findall(text))
    elif lang == "zh":
        if _KANA.search(text):
            return False
        n = len(_HAN.findall(text))
    else:
        return True
    return n > 0 and n >= 0.2 * letters


def clean_pair(en, xx, lang, source, args, reasons):
    """Return a cleaned (en, xx) or None, counting the reason for dropping in ``reasons``."""
    if source == "ui":
        en, xx = strip_ui_markup(en), strip_ui_markup(xx)
    en = en.replace("%PRODUCTNAME", "LibreOffice")
    xx = xx.replace("%PRODUCTNAME", "LibreOffice")
    en, xx = normalize_ws(en), normalize_ws(xx)
    if not en or not xx:
        reasons["empty"] += 1
        return None
    ph_en, ph_xx = _PLACEHOLDER.findall(en), _PLACEHOLDER.findall(xx)
    if ph_en or ph_xx:
        if len(ph_en) > args.max_placeholders or sorted(ph_en) != sorted(ph_xx):
            reasons["placeholders"] += 1
            return None
    if len(en) > args.max_chars or len(xx) > args.max_chars:
        reasons["too_long"] += 1
        return None
    if len(_PLACEHOLDER.sub(" ", en).split()) < args.min_words:
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
    if _CYRILLIC.search(en) or _HAN.search(en) or _KANA.search(en):
        reasons["non_english_source"] += 1
        return None
    lo, hi = RATIO_LIMITS[lang]
    ratio = (len(xx) + 10.0) / (len(en) + 10.0)
    if not lo <= ratio <= hi:
        reasons["length_ratio"] += 1
        return None
    return en, xx


def english_key(en):
    """Normalised English used for the split: case and punctuation variants share one key."""
    return " ".join(re.sub(r"[\W_]+", " ", en.casefold()).split())


def hash_of(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- stages


def pairs_path(out, source, lang):
    return os.path.join(out, "pairs", "%s.en-%s.tsv" % (source, lang))


def write_pairs(path, triples):
    rows = ["%s\t%s\t%s" % (en, xx, origin.replace("\t", " ")) for en, xx, origin in triples]
    atomic_write_lines(path, rows)
    return len(rows)


def read_pairs(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                yield parts


def stage_pairs(args, langs, sources, pkg_info, lists_dir):
    """Write OUT/pairs/<source>.en-<xx>.tsv (candidate pairs before cleaning)."""
    if "help" in sources:
        en_dir = os.path.join(pkg_info[LANG_INFO["en"]["help_pkg"]]["dir"], HELP_ROOT,
                              LANG_INFO["en"]["help_dir"])
        for lang in langs:
            path = pairs_path(args.out, "help", lang)
            if os.path.exists(path) and not args.force:
                continue
            xx_dir = os.path.join(pkg_info[LANG_INFO[lang]["help_pkg"]]["dir"], HELP_ROOT,
                                  LANG_INFO[lang]["help_dir"])
            if not os.path.isdir(xx_dir):
                raise UserError("help folder missing after unpacking: %s" % xx_dir)
            t = time.time()
            n = write_pairs(path, extract_help(en_dir, xx_dir))
            log("[pairs] help en-%s: %d candidate pairs (%.1fs)" % (lang, n, time.time() - t))
    if "ui" in sources:
        for lang in langs:
            path = pairs_path(args.out, "ui", lang)
            if os.path.exists(path) and not args.force:
                continue
            ui_dir = os.path.join(pkg_info[LANG_INFO[lang]["ui_pkg"]]["dir"], UI_ROOT,
                                  LANG_INFO[lang]["ui_dir"])
            if not os.path.isdir(ui_dir):
                raise UserError("UI catalog folder missing after unpacking: %s" % ui_dir)
            n = write_pairs(path, extract_ui(ui_dir))
            log("[pairs] ui   en-%s: %d candidate pairs" % (lang, n))
    if "ddtp" in sources:
        todo = [l for l in langs if args.force or not os.path.exists(pairs_path(args.out, "ddtp", l))]
        if todo:
            en_desc = read_translations(lists_dir, "en")
            if not en_desc:
                raise UserError("no Translation-en index found in %s" % lists_dir)
            log("[pairs] ddtp: %d English descriptions" % len(en_desc))
            for lang in todo:
                xx_desc = read_translations(lists_dir, LANG_INFO[lang]["ddtp"])
                n = write_pairs(pairs_path(args.out, "ddtp", lang),
                                extract_ddtp(en_desc, xx_desc, lang))
                log("[pairs] ddtp en-%s: %d descriptions, %d candidate pairs"
                    % (lang, len(xx_desc), n))


def stage_split(args, langs, sources):
    """Clean, de-duplicate and split; return the statistics that go into the manifest."""
    clean = {}     # lang -> {(en, xx): source}  (first source in SOURCES order wins)
    reasons = {}   # "en-xx" -> source -> reason -> count
    candidates = {}
    for lang in langs:
        pairs = collections.OrderedDict()
        for source in sources:
            r = collections.Counter()
            n = 0
            for en, xx, _origin in read_pairs(pairs_path(args.out, source, lang)):
                n += 1
                cp = clean_pair(en, xx, lang, source, args, r)
                if cp is None:
                    continue
                if cp in pairs:
                    r["duplicate"] += 1
                else:
                    pairs[cp] = source
            reasons.setdefault("en-" + lang, {})[source] = dict(sorted(r.items()))
            candidates.setdefault("en-" + lang, {})[source] = n
        clean[lang] = pairs
        log("[clean] en-%s: %d unique pairs (%s)" % (
            lang, len(pairs), ", ".join("%s %d" % (s, c) for s, c in
                                        sorted(collections.Counter(pairs.values()).items()))))

    # multi-way valid/test: English strings translated in every language by a LibreOffice source
    by_en = {}
    for lang in langs:
        m = {}
        for (en, xx), source in clean[lang].items():
            if source in LIBREOFFICE_SOURCES:
                m.setdefault(en, collections.Counter())[(xx, source)] += 1
        by_en[lang] = m
    common = set(by_en[langs[0]])
    for lang in langs[1:]:
        common &= set(by_en[lang])
    keys = {}
    for en in sorted(common):
        if len(en.split()) >= args.min_eval_words:
            keys.setdefault(english_key(en), []).append(en)
    ordered = sorted(keys, key=hash_of)
    log("[split] %d English sentences are translated into all of %s (%d usable keys)"
        % (len(common), ",".join(langs), len(ordered)))
    if len(ordered) < args.n_test + args.n_valid:
        raise UserError("only %d multi-way sentences, fewer than --n-test + --n-valid = %d"
                        % (len(ordered), args.n_test + args.n_valid))
    eval_keys = {"test": ordered[:args.n_test],
                 "valid": ordered[args.n_test:args.n_test + args.n_valid]}
    held_out = set(eval_keys["test"]) | set(eval_keys["valid"])

    def pick(en, lang):
        # most frequent translation; ties: help before ui, then lexicographic
        counter = by_en[lang][en]
        return min(counter, key=lambda k: (-counter[k], SOURCES.index(k[1]), k[0]))

    counts, leaked = {}, 0
    for lang in langs:
        pair = "en-" + lang
        rows = {}
        for split in ("valid", "test"):
            rows[split] = []
            for key in eval_keys[split]:
                en = keys[key][0]
                xx, source = pick(en, lang)
                rows[split].append((en, xx, source))
        train = [(en, xx, source) for (en, xx), source in clean[lang].items()
                 if english_key(en) not in held_out]
        leaked += len(clean[lang]) - len(train)
        train.sort(key=lambda r: hash_of(r[0] + "\t" + r[1]))
        rows["train"] = train
        counts[pair] = {}
        for split in SPLITS:
            rs = rows[split]
            atomic_write_lines(os.path.join(args.out, "raw", "%s.%s.en" % (split, pair)),
                               [r[0] for r in rs])
            atomic_write_lines(os.path.join(args.out, "raw", "%s.%s.%s" % (split, pair, lang)),
                               [r[1] for r in rs])
            atomic_write_lines(os.path.join(args.out, "meta", "%s.%s.source" % (split, pair)),
                               [r[2] for r in rs])
            by_source = collections.Counter(r[2] for r in rs)
            counts[pair][split] = {"total": len(rs)}
            counts[pair][split].update({s: by_source.get(s, 0) for s in sources})
        log("[split] %s: train %d, valid %d, test %d" % (
            pair, len(rows["train"]), len(rows["valid"]), len(rows["test"])))
    log("[split] %d pairs whose English matches a valid/test sentence were kept out of train"
        % leaked)
    return {"counts": counts, "candidate_pairs": candidates, "dropped": reasons,
            "held_out_from_train": leaked, "multiway_sentences_available": len(ordered)}


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        return out.splitlines()[0].strip() if out else None
    except OSError:
        return None


def index_info(lists_dir, langs):
    """Describe the apt index files the DDTP pairs came from (name, size, sha256, Date)."""
    files = []
    for code in ["en"] + [LANG_INFO[l]["ddtp"] for l in langs]:
        for path in translation_files(lists_dir, code):
            files.append({"file": os.path.basename(path), "size": os.path.getsize(path),
                          "sha256": sha256_file(path)})
    releases = {}
    for name in sorted(os.listdir(lists_dir)):
        if name.endswith(("InRelease", "_Release")):
            with open(os.path.join(lists_dir, name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("Date:"):
                        releases[name] = line.split(":", 1)[1].strip()
                        break
    return {"translation_files": files, "release_dates": releases}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Build an en<->{de,fr,es,ru,ja,zh} corpus of human translations from Debian "
                    "packages (LibreOffice help and UI, Debian description translations).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (raw/, meta/, pairs/, manifest.json)")
    p.add_argument("--cache", default=None,
                   help="download cache (apt lists, .debs, unpacked trees); default OUT/cache")
    p.add_argument("--langs", default=",".join(ALL_LANGS),
                   help="comma-separated non-English languages, a subset of " + ",".join(ALL_LANGS))
    p.add_argument("--sources", default=",".join(SOURCES),
                   help="comma-separated sources, a subset of " + ",".join(SOURCES))
    p.add_argument("--n-test", type=int, default=500, help="multi-way test sentences")
    p.add_argument("--n-valid", type=int, default=500, help="multi-way valid sentences")
    p.add_argument("--max-chars", type=int, default=200, help="maximum characters per side")
    p.add_argument("--min-words", type=int, default=2,
                   help="minimum English words (drops one-word labels)")
    p.add_argument("--min-eval-words", type=int, default=4,
                   help="minimum English words of a valid/test sentence")
    p.add_argument("--max-placeholders", type=int, default=1,
                   help="drop strings with more placeholders (%%s, %%1, $1, {0}, ...) than this")
    p.add_argument("--force", action="store_true",
                   help="redo the pair extraction and split stages even if their outputs exist")
    p.add_argument("--refresh-downloads", action="store_true",
                   help="also re-fetch the apt lists and .debs and unpack them again")
    p.add_argument("--bin", default=None,
                   help="where binarize.py writes the fairseq data (SentencePiece + fairseq-preprocess); "
                        "default OUT/bin")
    p.add_argument("--no-binarize", action="store_true",
                   help="stop after writing OUT/raw and OUT/manifest.json")
    p.add_argument("--workers", type=int, default=2, help="processes for binarization")
    args = p.parse_args(argv)
    langs = [l.strip() for l in args.langs.split(",") if l.strip()]
    bad = [l for l in langs if l not in ALL_LANGS]
    if bad or not langs:
        p.error("--langs must be a non-empty subset of %s (got %s)" % (",".join(ALL_LANGS), args.langs))
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not sources or any(s not in SOURCES for s in sources):
        p.error("--sources must be a non-empty subset of %s" % ",".join(SOURCES))
    args.langs = [l for l in ALL_LANGS if l in langs]
    args.sources = [s for s in SOURCES if s in sources]
    if not any(s in LIBREOFFICE_SOURCES for s in args.sources):
        p.error("--sources needs help or ui: the valid/test sets are built from LibreOffice text")
    return args


def main(argv=None):
    args = parse_args(argv)
    status = build(args)
    if status or args.no_binarize:
        return status
    bin_dir = os.path.abspath(args.bin or os.path.join(args.out, "bin"))
    log("[binarize] %s -> %s" % (os.path.join(args.out, "raw"), bin_dir))
    return binarize.main(["--raw", os.path.join(args.out, "raw"), "--out", bin_dir, "--workers", str(args.workers)]
                         + (["--force"] if args.force else []))


def build(args):
    """Stages 1-4: the raw corpus and its manifest."""
    t0 = time.time()
    args.out = os.path.abspath(args.out)
    cache = os.path.abspath(args.cache or os.path.join(args.out, "cache"))
    langs, sources = args.langs, args.sources
    config = {"langs": langs, "sources": sources, "n_test": args.n_test, "n_valid": args.n_valid,
              "max_chars": args.max_chars, "min_words": args.min_words,
              "min_eval_words": args.min_eval_words, "max_placeholders": args.max_placeholders}
    manifest_path = os.path.join(args.out, "manifest.json")
    if os.path.exists(manifest_path) and not args.force:
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        done = all(os.path.exists(os.path.join(args.out, f)) for f in old.get("sha256", {}))
        if old.get("config") == config and done:
            log("corpus already built in %s (manifest.json exists; --force to rebuild)" % args.out)
            return 0
    check_tools()
    os.makedirs(args.out, exist_ok=True)

    pkgs = []
    if "help" in sources:
        pkgs += [LANG_INFO[l]["help_pkg"] for l in ["en"] + langs]
    if "ui" in sources:
        pkgs += [LANG_INFO[l]["ui_pkg"] for l in langs]
    need_lists = "ddtp" in sources or any(
        not glob.glob(os.path.join(cache, "debs", glob.escape(p) + "_*.deb")) for p in pkgs) or args.refresh_downloads
    lists_dir = os.path.join(cache, "apt-lists")
    if need_lists:
        lists_dir = apt_update(cache, langs, args.refresh_downloads)
    t = time.time()
    pkg_info = fetch_packages(pkgs, cache, lists_dir, args.refresh_downloads)
    log("[debs] %d packages ready in %.1fs" % (len(pkgs), time.time() - t))

    t = time.time()
    stage_pairs(args, langs, sources, pkg_info, lists_dir)
    log("[pairs] done in %.1fs" % (time.time() - t))
    t = time.time()
    stats = stage_split(args, langs, sources)
    log("[split] done in %.1fs" % (time.time() - t))

    files = {}
    for sub in ("raw", "meta"):
        for name in sorted(os.listdir(os.path.join(args.out, sub))):
            if not name.startswith("."):
                files["%s/%s" % (sub, name)] = sha256_file(os.path.join(args.out, sub, name))
    manifest = {
        "description": "en<->xx human translations from Debian packages "
                       "(LibreOffice help, LibreOffice UI, Debian description translations)",
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "config": config,
        "packages": {p: {k: v for k, v in i.items() if k != "dir"} for p, i in pkg_info.items()},
        "ddtp_indexes": index_info(lists_dir, langs) if "ddtp" in sources else None,
        "tools": {"apt-get": tool_version(["apt-get", "--version"]),
                  "dpkg-deb": tool_version(["dpkg-deb", "--version"]),
                  "python": sys.version.split()[0]},
        "licenses": {"help": "MPL-2.0 (LibreOffice)", "ui": "MPL-2.0 (LibreOffice)",
                     "ddtp": "Debian package descriptions: each under its package's licence "
                             "(translations via DDTP)"},
        "layout": "raw/{split}.en-{xx}.{en,xx}: parallel lines; meta/{split}.en-{xx}.source: "
                  "source of each line; valid/test are multi-way (same English, same order, "
                  "for every language)",
        "sha256": files,
    }
    manifest.update(stats)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    log("wrote %s (total %.1fs)" % (manifest_path, time.time() - t0))
    return 0


if __name__ == "__main__":
    run_main(main)
