"""Step 2, extract: candidate (English, translation) pairs from each source, before cleaning.

Reads the unpacked packages and apt lists that ``corpus.fetch`` made ready. Writes
``OUT/pairs/<source>.en-<xx>.tsv``: one ``en<TAB>xx<TAB>origin`` line per candidate pair, in the
order the source yields them (origin says where the pair came from: page#par_id, catalog:context
or package:segment). A file that exists is kept unless ``force``. Entry point: ``extract_all``.
One module per source format:

* ``libreoffice_help`` (source ``help``): help HTML paragraphs aligned by id;
* ``libreoffice_ui`` (source ``ui``): gettext .mo interface catalogs;
* ``debian_descriptions`` (source ``ddtp``): apt Translation-<lang> indexes.
"""

import os
import time

from corpus.sources import debian_descriptions, libreoffice_help, libreoffice_ui
from layout import DEBIAN_NAMES
from script_support import UserError, atomic_write_lines, log


def pairs_path(out, source, lang):
    return os.path.join(out, "pairs", "%s.en-%s.tsv" % (source, lang))


def write_pairs(path, triples):
    """Write (en, xx, origin) triples as a pairs file; return how many."""
    rows = ["%s\t%s\t%s" % (en, xx, origin.replace("\t", " ")) for en, xx, origin in triples]
    atomic_write_lines(path, rows)
    return len(rows)


def read_pairs(path):
    """Yield [en, xx, origin] from a pairs file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                yield parts


def _package_folder(pkg_info, lang, kind, root):
    """The unpacked folder of ``lang``'s help or ui package (``kind`` is "help" or "ui")."""
    names = DEBIAN_NAMES[lang]
    return os.path.join(pkg_info[names[kind + "_pkg"]]["dir"], root, names[kind + "_dir"])


def _extract_packaged(out, source, langs, force, folder_of, extract, what):
    """Write OUT/pairs/<source>.en-<xx>.tsv from each language's unpacked package folder
    (``folder_of(lang)``, read by ``extract(folder)``); ``what`` names the folder in errors."""
    for lang in langs:
        path = pairs_path(out, source, lang)
        if os.path.exists(path) and not force:
            continue
        folder = folder_of(lang)
        if not os.path.isdir(folder):
            raise UserError("%s missing after unpacking: %s" % (what, folder))
        t = time.time()
        n = write_pairs(path, extract(folder))
        log("[pairs] %-4s en-%s: %d candidate pairs (%.1fs)" % (source, lang, n, time.time() - t))


def extract_all(out, langs, sources, pkg_info, lists_dir, force):
    """Write OUT/pairs/<source>.en-<xx>.tsv for every source and language."""
    if "help" in sources:
        en_dir = _package_folder(pkg_info, "en", "help", libreoffice_help.HELP_ROOT)
        _extract_packaged(out, "help", langs, force,
                          lambda lang: _package_folder(pkg_info, lang, "help", libreoffice_help.HELP_ROOT),
                          lambda xx_dir: libreoffice_help.extract_pairs(en_dir, xx_dir), "help folder")
    if "ui" in sources:
        _extract_packaged(out, "ui", langs, force,
                          lambda lang: _package_folder(pkg_info, lang, "ui", libreoffice_ui.UI_ROOT),
                          libreoffice_ui.extract_pairs, "UI catalog folder")
    if "ddtp" in sources:
        todo = [l for l in langs if force or not os.path.exists(pairs_path(out, "ddtp", l))]
        if todo:
            en_desc = debian_descriptions.read_translations(lists_dir, "en")
            if not en_desc:
                raise UserError("no Translation-en index found in %s" % lists_dir)
            log("[pairs] ddtp: %d English descriptions" % len(en_desc))
            for lang in todo:
                xx_desc = debian_descriptions.read_translations(lists_dir, DEBIAN_NAMES[lang]["ddtp"])
                n = write_pairs(pairs_path(out, "ddtp", lang),
                                debian_descriptions.extract_pairs(en_desc, xx_desc, lang))
                log("[pairs] ddtp en-%s: %d descriptions, %d candidate pairs"
                    % (lang, len(xx_desc), n))
