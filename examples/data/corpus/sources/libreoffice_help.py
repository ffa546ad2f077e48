"""Source ``help``: LibreOffice offline help (``libreoffice-help-*``), paragraphs aligned by id.

Reads the unpacked HTML pages ``usr/share/libreoffice/help/<lang>/text/**/*.html`` of English and
one other language; writes nothing. The same page exists in every language and its paragraphs
carry the same ``id="par_id..."``, so (page, id) aligns them exactly. Text in ``hidden`` elements
(e.g. the macOS variant of a menu path), in script/style, and code paragraphs are left out.
Entry point: ``extract_pairs``.
"""

import collections
import html.parser
import os

from corpus.text import normalize_ws

HELP_ROOT = "usr/share/libreoffice/help"


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
    """The HTML pages under ``lang_dir/text``, as sorted paths relative to it."""
    root = os.path.join(lang_dir, "text")
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".html"):
                out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


def extract_pairs(en_dir, xx_dir):
    """Yield (en, xx, origin) for every par_id shared by the same file in both languages;
    ``en_dir`` and ``xx_dir`` are the ``HELP_ROOT/<lang>`` folders of the unpacked packages."""
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
