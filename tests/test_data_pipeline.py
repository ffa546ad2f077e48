"""Unit tests of the corpus builder's steps (examples/data/corpus/) on tiny fixtures made here:
no network, no apt, no Debian packages."""

import gzip
import hashlib
import os
import struct
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_SCRIPTS = os.path.join(REPO, "examples", "data")
sys.path.insert(0, DATA_SCRIPTS)

import script_support  # noqa: E402
from corpus import clean, split  # noqa: E402
from corpus.sources import debian_descriptions, libreoffice_help, libreoffice_ui, read_pairs, write_pairs  # noqa: E402

OPTIONS = types.SimpleNamespace(max_placeholders=1, max_chars=200, min_words=2, min_eval_words=4,
                                n_test=2, n_valid=1)


# ----------------------------------------------------------------------------- help (HTML)

EN_PAGE = """<html><body>
<h1 id="par_id1">Formatting Cells</h1>
<p id="par_id2" class="paragraph">Choose <span class="menuitem">Format - Cells</span>.<span hidden="true"> Mac: Format - Cells</span></p>
<p id="par_id3" class="code">print("x")</p>
<p id="par_id4">Only in English</p>
<p id="par_id5">Line one<br>line &amp; two</p>
</body></html>"""
DE_PAGE = """<html><body>
<h1 id="par_id1">Zellen formatieren</h1>
<p id="par_id2" class="paragraph">Wählen Sie <span class="menuitem">Format - Zellen</span>.<span hidden="true"> Mac: Format - Zellen</span></p>
<p id="par_id3" class="code">print("x")</p>
<p id="par_id5">Zeile eins<br/>Zeile &amp; zwei</p>
</body></html>"""


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)


def test_help_pairs_aligned_by_page_and_paragraph_id(tmp_path):
    en_dir, de_dir = str(tmp_path / "en-US"), str(tmp_path / "de")
    write(os.path.join(en_dir, "text", "scalc", "cells.html"), EN_PAGE)
    write(os.path.join(de_dir, "text", "scalc", "cells.html"), DE_PAGE)
    write(os.path.join(en_dir, "text", "scalc", "only_en.html"), EN_PAGE)  # no German page
    assert list(libreoffice_help.extract_pairs(en_dir, de_dir)) == [
        ("Formatting Cells", "Zellen formatieren", "scalc/cells.html#par_id1"),
        # hidden (macOS) text left out, code paragraph par_id3 skipped, par_id4 has no German
        ("Choose Format - Cells.", "Wählen Sie Format - Zellen.", "scalc/cells.html#par_id2"),
        ("Line one line & two", "Zeile eins Zeile & zwei", "scalc/cells.html#par_id5"),
    ]


# ----------------------------------------------------------------------------- ui (gettext .mo)


def mo_bytes(entries):
    """A little-endian gettext .mo file (revision 0, no hash table) holding ``entries``
    ({msgid bytes: msgstr bytes}; keys sorted as msgfmt sorts them)."""
    keys = sorted(entries)
    n = len(keys)
    tables_end = 28 + 16 * n
    blob, originals, translations = b"", [], []
    for k in keys:
        originals.append((len(k), tables_end + len(blob)))
        blob += k + b"\0"
    for k in keys:
        translations.append((len(entries[k]), tables_end + len(blob)))
        blob += entries[k] + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    for length, offset in originals + translations:
        out += struct.pack("<2I", length, offset)
    return out + blob


MO_ENTRIES = {
    b"": b"Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n",
    b"Save the ~document": "Das ~Dokument speichern".encode(),
    b"menu\x04Open file": "Datei öffnen".encode(),                   # context "menu"
    b"%1 file\x00%1 files": "%1 Datei\x00%1 Dateien".encode(),       # plural entry
    b"dialog\x04Not translated": b"",                                 # empty msgstr
}


def test_mo_catalog_contexts_kept_plurals_and_header_skipped(tmp_path):
    path = str(tmp_path / "de" / "LC_MESSAGES" / "sw.mo")
    write(path, mo_bytes(MO_ENTRIES), "wb")
    assert list(libreoffice_ui.read_mo(path)) == [
        ("", "Save the ~document", "Das ~Dokument speichern"),
        ("dialog", "Not translated", ""),
        ("menu", "Open file", "Datei öffnen"),
    ]
    assert list(libreoffice_ui.extract_pairs(str(tmp_path / "de"))) == [
        ("Save the ~document", "Das ~Dokument speichern", "sw:"),
        ("Open file", "Datei öffnen", "sw:menu"),
    ]


def test_mo_catalog_read_like_msgfmt_writes_it(tmp_path):
    msgfmt = subprocess.run(["which", "msgfmt"], stdout=subprocess.PIPE, text=True).stdout.strip()
    if not msgfmt:
        pytest.skip("GNU msgfmt is not installed")
    po = tmp_path / "x.po"
    po.write_text('msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n'
                  '"Plural-Forms: nplurals=2; plural=(n != 1);\\n"\n\n'
                  'msgctxt "menu"\nmsgid "Open file"\nmsgstr "Datei öffnen"\n\n'
                  'msgid "%1 file"\nmsgid_plural "%1 files"\nmsgstr[0] "%1 Datei"\nmsgstr[1] "%1 Dateien"\n\n'
                  'msgid "Save the ~document"\nmsgstr "Das ~Dokument speichern"\n', encoding="utf-8")
    mo = tmp_path / "x.mo"
    subprocess.run([msgfmt, "-o", str(mo), str(po)], check=True)
    assert list(libreoffice_ui.read_mo(str(mo))) == [
        ("", "Save the ~document", "Das ~Dokument speichern"), ("menu", "Open file", "Datei öffnen")]


def test_a_file_that_is_not_a_catalog_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.mo"
    path.write_bytes(b"not a gettext catalog at all")
    with pytest.raises(script_support.UserError, match="cannot read gettext catalog"):
        list(libreoffice_ui.read_mo(str(path)))


# ----------------------------------------------------------------------------- ddtp (apt indexes)

EN_INDEX = """Package: conv
Description-md5: 0001
Description-en: tool to convert files
 This package converts files. It is fast.
 .
 Features:
  - reads text
  - writes images

Package: other
Description-md5: 0002
Description-en: another tool
 One paragraph.
 .
 Two paragraphs.

Package: lonely
Description-md5: 0003
Description-en: only in English
"""
DE_INDEX = """Package: conv
Description-md5: 0001
Description-de: Werkzeug zum Umwandeln von Dateien
 Dieses Paket wandelt Dateien um. Es ist schnell.
 .
 Funktionen:
  - liest Text
  - schreibt Bilder

Package: other
Description-md5: 0002
Description-de: ein anderes Werkzeug
 Nur ein Absatz.
"""


def test_debian_descriptions_aligned_on_md5_segments_and_sentences(tmp_path):
    lists = tmp_path / "lists"
    write(str(lists / "deb.example_debian_dists_x_main_i18n_Translation-en"), EN_INDEX)
    with gzip.open(str(lists / "deb.example_debian_dists_x_main_i18n_Translation-de.gz"), "wt") as f:
        f.write(DE_INDEX)
    en = debian_descriptions.read_translations(str(lists), "en")
    de = debian_descriptions.read_translations(str(lists), "de")
    assert sorted(en) == ["0001", "0002", "0003"] and sorted(de) == ["0001", "0002"]
    assert list(debian_descriptions.extract_pairs(en, de, "de")) == [
        ("tool to convert files", "Werkzeug zum Umwandeln von Dateien", "conv:0"),
        ("This package converts files.", "Dieses Paket wandelt Dateien um.", "conv:1.0"),
        ("It is fast.", "Es ist schnell.", "conv:1.1"),
        ("Features:", "Funktionen:", "conv:2"),
        ("reads text", "liest Text", "conv:3"),
        ("writes images", "schreibt Bilder", "conv:4"),
        # 3 English segments but 2 German ones: only the short descriptions are aligned
        ("another tool", "ein anderes Werkzeug", "other:0"),
    ]


def test_pairs_file_round_trip(tmp_path):
    path = str(tmp_path / "pairs" / "ui.en-de.tsv")
    assert write_pairs(path, [("a b", "c d", "x:y"), ("e", "f", "tab\there")]) == 2
    assert list(read_pairs(path)) == [["a b", "c d", "x:y"], ["e", "f", "tab here"]]


# ----------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize("raw, stripped", [
    ("~Open", "Open"), ("_Save As...", "Save As..."), ("&File", "File"),
    ("保存(_S)", "保存"), ("下一步(N) >", "下一步 >"), ("名前を付けて保存(A)...", "名前を付けて保存..."),
    ("snake_case_name", "snakecasename"), ("R&amp;D", "R&amp;D"),
])
def test_accelerator_markers_are_stripped(raw, stripped):
    assert clean.strip_ui_markup(raw) == stripped


@pytest.mark.parametrize("en, xx, lang, source, reason", [
    ("Insert the chart", "Insert the chart", "de", "help", "untranslated"),
    ("Insert the chart", "insert the Chart", "fr", "help", "untranslated"),
    ("Insert the chart", "Insert the chart now", "ru", "help", "wrong_script"),
    ("Insert the chart", "グラフを挿入", "zh", "help", "wrong_script"),   # kana: Japanese, not Chinese
    ("Delete %s files", "Dateien löschen", "de", "ui", "placeholders"),
    ("Copy %1 to %2", "%1 nach %2 kopieren", "de", "ui", "placeholders"),  # more than one
    ("Open {0} now", "Jetzt $1 öffnen", "de", "ui", "placeholders"),
    ("Cells", "Zellen", "de", "ui", "too_few_words"),
    ("~", "~", "de", "ui", "empty"),
    ("Insert a very short chart", "Ein", "de", "help", "length_ratio"),
])
def test_cleaning_drops_and_counts(en, xx, lang, source, reason):
    import collections
    reasons = collections.Counter()
    assert clean.clean_pair(en, xx, lang, source, OPTIONS, reasons) is None
    assert reasons == {reason: 1}


@pytest.mark.parametrize("en, xx, lang, source, kept", [
    ("Save the ~document", "Das ~Dokument speichern", "de", "ui", ("Save the document", "Das Dokument speichern")),
    ("Start %PRODUCTNAME now", "%PRODUCTNAME jetzt starten", "de", "help",
     ("Start LibreOffice now", "LibreOffice jetzt starten")),
    ("Delete %1 rows", "%1 Zeilen löschen", "de", "ui", ("Delete %1 rows", "%1 Zeilen löschen")),
    ("Save the document", "文書を保存(_S)", "ja", "ui", ("Save the document", "文書を保存")),
    ("Insert the chart", "Вставить диаграмму", "ru", "help", ("Insert the chart", "Вставить диаграмму")),
])
def test_cleaning_keeps_and_normalises(en, xx, lang, source, kept):
    import collections
    reasons = collections.Counter()
    assert clean.clean_pair(en, xx, lang, source, OPTIONS, reasons) == kept
    assert not reasons


def test_duplicates_across_sources_count_for_the_first_source(tmp_path):
    out = str(tmp_path)
    write_pairs(os.path.join(out, "pairs", "help.en-de.tsv"), [("Save the document", "Dokument speichern", "a#1")])
    write_pairs(os.path.join(out, "pairs", "ui.en-de.tsv"), [("Save the ~document", "~Dokument speichern", "b:"),
                                                              ("Save the document", "Dokument speichern", "c:")])
    pairs, dropped, candidates = clean.clean_corpus(out, ["de"], ["help", "ui"], OPTIONS)
    assert dict(pairs["de"]) == {("Save the document", "Dokument speichern"): "help"}
    assert dropped == {"en-de": {"help": {}, "ui": {"duplicate": 2}}}
    assert candidates == {"en-de": {"help": 1, "ui": 2}}


# ----------------------------------------------------------------------------- split


def toy_clean_corpus(reverse=False):
    """Clean pairs for de and ru: 5 multi-way sentences (one also in other casing), plus extras."""
    shared = ["Select the cell range now", "Click the OK button here", "Open the Format menu first",
              "Choose a new file name", "Press Enter to confirm this"]
    clean_pairs = {}
    for lang, tag in (("de", "DE"), ("ru", "РУ")):
        rows = [((en, "%s %s" % (tag, en)), "help") for en in shared]
        rows.append(((shared[0].upper(), "%s upper" % tag), "ui"))          # same key as shared[0]
        rows += [(("Only %s sentence %d" % (lang, i), "%s %d" % (tag, i)), "ddtp") for i in range(4)]
        clean_pairs[lang] = dict(reversed(rows) if reverse else rows)
    return clean_pairs


def read(out, name):
    with open(os.path.join(out, "raw", name), encoding="utf-8") as f:
        return f.read().splitlines()


def test_hash_split_is_deterministic_multiway_and_leak_free(tmp_path):
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    results = [split.split_corpus(out, toy_clean_corpus(reverse=i == 1), ["de", "ru"], ["help", "ui", "ddtp"], OPTIONS)
               for i, out in enumerate(outs)]
    assert results[0] == results[1]
    for name in sorted(os.listdir(os.path.join(outs[0], "raw"))):  # input order does not matter
        assert read(outs[0], name) == read(outs[1], name), name
    out = outs[0]
    counts, held_out, multiway = results[0]
    assert multiway == 5
    test_en, valid_en = read(out, "test.en-de.en"), read(out, "valid.en-de.en")
    assert test_en == read(out, "test.en-ru.en") and valid_en == read(out, "valid.en-ru.en")
    keys = sorted({split.english_key(e) for e in test_en + valid_en})
    assert [split.english_key(e) for e in test_en + valid_en] == sorted(keys, key=split.hash_of)
    held = set(keys)
    for lang in ("de", "ru"):
        train = list(zip(read(out, "train.en-%s.en" % lang), read(out, "train.en-%s.%s" % (lang, lang))))
        assert not {split.english_key(e) for e, _ in train} & held
        assert train == sorted(train, key=lambda r: hashlib.sha1(("%s\t%s" % r).encode()).hexdigest())
        assert counts["en-" + lang]["train"]["total"] == len(train) == 10 - held_out // 2
    with open(os.path.join(out, "meta", "test.en-de.source"), encoding="utf-8") as f:
        assert f.read().splitlines() == ["help", "help"]


def test_too_few_multiway_sentences_is_a_one_line_error(tmp_path):
    options = types.SimpleNamespace(**dict(vars(OPTIONS), n_test=5, n_valid=5))
    with pytest.raises(script_support.UserError, match="only 5 multi-way sentences"):
        split.split_corpus(str(tmp_path), toy_clean_corpus(), ["de", "ru"], ["help", "ui", "ddtp"], options)


# ----------------------------------------------------------------------------- command line


def test_build_corpus_rejects_bad_options_with_one_line():
    script = os.path.join(DATA_SCRIPTS, "build_corpus.py")
    proc = subprocess.run([sys.executable, script, "--out", "/nonexistent", "--langs", "de,xx"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "build_corpus.py: error: --langs must be a non-empty subset of de,fr,es,ru,ja,zh,it (got de,xx)")


# ----------------------------------------------------------------------------- binarize.py's fairseq-preprocess step


def test_forked_preprocess_failure_is_one_line_and_writes_nothing(data_dir, tmp_path):
    """fairseq-preprocess runs forked from binarize.py's process (fairseq imported once); a pair
    whose input is missing stops with fairseq's own last line and moves nothing into the output."""
    from binarize_steps.fairseq_preprocess import run_preprocess

    args = types.SimpleNamespace(workers=1, out=str(tmp_path), fairseq_preprocess=None)
    with pytest.raises(script_support.UserError, match=r"^fairseq-preprocess en-xx failed: .*No such file"):
        run_preprocess(args, [(("en", "xx"), ["train"])], os.path.join(data_dir, "dict.txt"), str(tmp_path / "spm"))
    assert os.listdir(tmp_path) == []  # not even its temporary folder
