"""Source ``ui``: LibreOffice interface catalogs (``libreoffice-l10n-*``), English msgid -> msgstr.

Reads the gettext ``.mo`` catalogs ``usr/lib/libreoffice/program/resource/<ll>/LC_MESSAGES/*.mo``
of one language with the standard library's ``gettext.GNUTranslations``; writes nothing. Entries
with a context (``msgctxt``) keep it in their origin; plural entries (``msgid_plural``) and the
catalog header are skipped. Entry point: ``extract_pairs``.
"""

import gettext
import glob
import os
import struct

from corpus.text import normalize_ws
from script_support import UserError

UI_ROOT = "usr/lib/libreoffice/program/resource"
_CONTEXT_SEPARATOR = "\x04"  # how gettext joins msgctxt and msgid in a catalog key


def read_mo(path):
    """Yield (context, msgid, msgstr) of a gettext .mo file in catalog order; plural entries and
    the header are skipped, an entry without a context has context ''."""
    try:
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)
    except (OSError, UnicodeDecodeError, struct.error) as e:
        raise UserError("cannot read gettext catalog %s: %s" % (path, e))
    # GNUTranslations keeps the parsed catalog in ``_catalog``: msgid -> msgstr, with
    # (msgid, n) -> n-th plural form for plural entries and '' -> the header
    for key, msgstr in catalog._catalog.items():
        if not isinstance(key, str) or not key or "\x00" in msgstr:
            continue
        ctx, msgid = key.split(_CONTEXT_SEPARATOR, 1) if _CONTEXT_SEPARATOR in key else ("", key)
        yield ctx, msgid, msgstr


def extract_pairs(ui_dir):
    """Yield (en, xx, origin) from every .mo catalog of ``ui_dir`` (``UI_ROOT/<ll>``)."""
    for path in sorted(glob.glob(os.path.join(ui_dir, "LC_MESSAGES", "*.mo"))):
        catalog = os.path.basename(path)[:-3]
        for ctx, msgid, msgstr in read_mo(path):
            en, xx = normalize_ws(msgid), normalize_ws(msgstr)
            if en and xx:
                yield en, xx, "%s:%s" % (catalog, ctx)
