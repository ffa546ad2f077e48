"""The corpus's languages, their Debian names, its splits, sources and file names: the one home of these
facts for build_corpus.py and its steps, binarize.py, make_bundled.py and the examples."""

# the xx of every en-xx pair, in the order used everywhere (command-line defaults, files, tables)
XX_LANGS = ("de", "fr", "es", "ru", "ja", "zh")
# languages the scripts also build on request (``--langs it``) but never by default: the seventh
# language that docs/add-language.md adds to a model trained on the six, built the same way
ADDED_LANGS = ("it",)
ALL_XX_LANGS = XX_LANGS + ADDED_LANGS
SPLITS = ("train", "valid", "test")
# where pairs come from (the values of meta/<split>.en-<xx>.source), in order of precedence when
# one pair comes from several: LibreOffice help, LibreOffice interface, Debian descriptions
SOURCES = ("help", "ui", "ddtp")
LIBREOFFICE_SOURCES = ("help", "ui")  # MPL-2.0; the valid/test sets and the bundled slice use these

# what Debian calls each language: the LibreOffice help package and its folder under
# usr/share/libreoffice/help/, the interface-catalog package and its folder under
# usr/lib/libreoffice/program/resource/, and the code of apt's Translation-<code> index
DEBIAN_NAMES = {
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
    "it": {"help_pkg": "libreoffice-help-it", "help_dir": "it", "ui_pkg": "libreoffice-l10n-it",
           "ui_dir": "it", "ddtp": "it"},
}


def raw_name(split, xx, lang):
    """File name of one side of a parallel text file: ``{split}.en-{xx}.{lang}``, lang in (en, xx)."""
    return "%s.en-%s.%s" % (split, xx, lang)


def pair_name(split, source, target, lang):
    """File name of one side of a parallel text of any pair: ``{split}.{source}-{target}.{lang}``,
    lang in (source, target): fairseq's naming, which ``translation_multi_simple_epoch`` reads in
    both directions (``raw_name`` is the en-xx case)."""
    return "%s.%s-%s.%s" % (split, source, target, lang)


def add_selection_options(parser, sources=SOURCES):
    """``--langs`` (default: all of XX_LANGS; ADDED_LANGS only when named) and ``--sources`` (default:
    ``sources``), comma-separated."""
    parser.add_argument("--langs", default=",".join(XX_LANGS),
                        help="comma-separated non-English languages, a subset of " + ",".join(ALL_XX_LANGS)
                        + " (default: " + ",".join(XX_LANGS) + ")")
    parser.add_argument("--sources", default=",".join(sources),
                        help="comma-separated sources, a subset of " + ",".join(SOURCES))


def parse_selection(parser, args):
    """Turn ``args.langs`` / ``args.sources`` into lists in the order of ALL_XX_LANGS / SOURCES; a value
    outside them, or none, stops with one usage line (``parser.error``, exit status 2)."""
    for option, allowed in (("langs", ALL_XX_LANGS), ("sources", SOURCES)):
        given = getattr(args, option)
        chosen = [v.strip() for v in given.split(",") if v.strip()]
        if not chosen or any(v not in allowed for v in chosen):
            parser.error("--%s must be a non-empty subset of %s (got %s)" % (option, ",".join(allowed), given))
        setattr(args, option, [v for v in allowed if v in chosen])
