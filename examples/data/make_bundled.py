#!/usr/bin/env python3
"""Cut the small, committed slice of the corpus that the quickstart and the tests use offline.

Reads a corpus built by ``build_corpus.py`` and writes, under ``--out``:

* ``<name>.tar.xz``: one deterministic archive (sorted entries, fixed mtime/owner/mode) holding
  ``<name>/raw/{train,valid,test}.en-<xx>.{en,<xx>}`` and ``<name>/manifest.json``:
  ``--train-per-lang`` training pairs per language (only sentences of at most ``--max-chars``
  characters on both sides, so that a CPU model learns something quickly) and the first
  ``--n-valid`` / ``--n-test`` sentences of the corpus's multi-way valid/test sets (the English
  side is identical, line for line, in every language).
* ``ATTRIBUTION.md`` (for another ``--name`` than the default: ``ATTRIBUTION-<name>.md``, so that
  each archive keeps its own): where the text comes from, its licences, and how the slice was made.

By default only the LibreOffice sources (help and UI, MPL-2.0) are bundled; the Debian
description translations stay in the full corpus only (``--sources`` changes that).
The same corpus and options give byte-identical outputs.

Example::

    python examples/data/make_bundled.py --corpus /tmp/taskmoe_corpus --out examples/data/bundled
"""

import hashlib
import io
import json
import lzma
import os
import tarfile

from layout import (DEBIAN_NAMES, LIBREOFFICE_SOURCES, SPLITS, add_selection_options, parse_selection,  # noqa: E402
                    raw_name)  # (sibling modules)
from script_support import UserError, atomic_write, atomic_write_text, run_main, script_parser  # noqa: E402
FIXED_MTIME = 1700000000  # 2023-11-14; any constant keeps the archive reproducible


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def load_pair(raw, meta, split, lang):
    """Return [(en, xx, source)] for one split of en-<lang>."""
    pair = "en-" + lang
    en_path = os.path.join(raw, raw_name(split, lang, "en"))
    xx_path = os.path.join(raw, raw_name(split, lang, lang))
    for path in (en_path, xx_path):
        if not os.path.isfile(path):
            raise UserError("missing corpus file %s (run build_corpus.py first)" % path)
    en, xx = read_lines(en_path), read_lines(xx_path)
    src_path = os.path.join(meta, "%s.%s.source" % (split, pair))
    sources = read_lines(src_path) if os.path.isfile(src_path) else ["unknown"] * len(en)
    if not len(en) == len(xx) == len(sources):
        raise UserError("%s/%s.%s: %d English, %d %s, %d source lines; the corpus is damaged"
                        % (raw, split, pair, len(en), len(xx), lang, len(sources)))
    return list(zip(en, xx, sources))


def select(args):
    """Return ({(split, lang): rows}, counts) for the bundled slice."""
    raw, meta = os.path.join(args.corpus, "raw"), os.path.join(args.corpus, "meta")
    chosen, counts = {}, {}
    for lang in args.langs:
        pair = "en-" + lang
        counts[pair] = {}
        for split in SPLITS:
            rows = load_pair(raw, meta, split, lang)
            if split == "train":
                # train files are already in a hash-shuffled order: take the first that qualify
                rows = [r for r in rows if r[2] in args.sources
                        and len(r[0]) <= args.max_chars and len(r[1]) <= args.max_chars]
                if len(rows) < args.train_per_lang:
                    raise UserError("en-%s: only %d training pairs of <= %d characters from %s, "
                                    "fewer than --train-per-lang %d" % (
                                        lang, len(rows), args.max_chars,
                                        ",".join(args.sources), args.train_per_lang))
                rows = rows[:args.train_per_lang]
            else:
                n = args.n_valid if split == "valid" else args.n_test
                if len(rows) < n:
                    raise UserError("en-%s: the corpus has %d %s sentences, fewer than %d"
                                    % (lang, len(rows), split, n))
                rows = rows[:n]
                bad = sorted({r[2] for r in rows} - set(args.sources))
                if bad:
                    raise UserError("en-%s %s contains sentences from %s, outside --sources %s"
                                    % (lang, split, ",".join(bad), ",".join(args.sources)))
            chosen[(split, lang)] = rows
            by_source = {}
            for r in rows:
                by_source[r[2]] = by_source.get(r[2], 0) + 1
            counts[pair][split] = dict(total=len(rows), **dict(sorted(by_source.items())))
    # the multi-way property the tests rely on: same English, same order, in every language
    for split in ("valid", "test"):
        first = [r[0] for r in chosen[(split, args.langs[0])]]
        for lang in args.langs[1:]:
            if [r[0] for r in chosen[(split, lang)]] != first:
                raise UserError("%s English side differs between en-%s and en-%s: the corpus "
                                "valid/test sets are not multi-way" % (split, args.langs[0], lang))
    return chosen, counts


def tar_bytes(files):
    """Deterministic .tar.xz of {archive path: bytes} (sorted, fixed metadata)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = set()
        for path in files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for path in sorted(dirs | set(files)):
            info = tarfile.TarInfo(path)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if path in dirs:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(files[path])
                tar.addfile(info, io.BytesIO(files[path]))
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)


def attribution(args, corpus_manifest, counts, archive_name, archive_sha, archive_size):
    packages = corpus_manifest.get("packages", {})
    wanted = []
    for lang in ["en"] + args.langs:
        if "help" in args.sources:
            wanted.append(DEBIAN_NAMES[lang]["help_pkg"])
        if "ui" in args.sources and lang != "en":
            wanted.append(DEBIAN_NAMES[lang]["ui_pkg"])
    lines = [
        "# Attribution of the bundled corpus slice",
        "",
        "`%s` (%d bytes, sha256 `%s`) holds English <-> {%s} sentence pairs taken from the "
        "following sources:" % (archive_name, archive_size, archive_sha, ", ".join(args.langs)),
        "",
    ]
    if "help" in args.sources:
        lines += ["* **LibreOffice offline help** (`libreoffice-help-*` Debian packages): "
                  "paragraphs aligned by their shared `par_id` in the same help page. "
                  "Licence: Mozilla Public License 2.0 (MPL-2.0), some text incorporating "
                  "Apache-2.0-licensed material from OpenOffice.org; copyright The Document "
                  "Foundation, LibreOffice contributors, Oracle and/or its affiliates."]
    if "ui" in args.sources:
        lines += ["* **LibreOffice user-interface translations** (`libreoffice-l10n-*` Debian "
                  "packages, gettext catalogs): English message -> translated message. "
                  "Licence: MPL-2.0, as above."]
    if "ddtp" in args.sources:
        lines += ["* **Debian package descriptions and their translations** (Debian "
                  "Description Translation Project, apt `Translation-*` indexes). Each "
                  "description is under the licence of the package it describes."]
    else:
        lines += ["", "The full corpus also has Debian package-description translations (DDTP); "
                  "they are *not* in this archive, so everything bundled here is LibreOffice "
                  "text under MPL-2.0."]
    lines += [
        "",
        "The MPL-2.0 text is at https://www.mozilla.org/MPL/2.0/ (and, on Debian systems, "
        "`/usr/share/common-licenses/MPL-2.0`). The source form of the covered text is the "
        "LibreOffice help and translation repositories (https://git.libreoffice.org/help, "
        "https://git.libreoffice.org/translations) and the Debian source package `libreoffice`.",
        "",
        "## Packages",
        "",
        "| package | version | .deb sha256 |",
        "|---|---|---|",
    ]
    for pkg in wanted:
        info = packages.get(pkg, {})
        lines.append("| %s | %s | `%s` |" % (pkg, info.get("version", "?"), info.get("sha256", "?")))
    lines += [
        "",
        "## How it was made",
        "",
        "```",
        corpus_manifest.get("command", "build_corpus.py --out CORPUS"),
        "python examples/data/make_bundled.py --corpus CORPUS --out examples/data/bundled "
        + options_string(args),
        "```",
        "",
        "`build_corpus.py` downloads the packages with `apt-get download`, unpacks them with "
        "`dpkg-deb -x`, aligns the text, cleans it (accelerator markers, placeholders, "
        "untranslated entries, script checks, length and length-ratio limits), removes "
        "duplicates and splits by a hash of the English side (corpus built %s). valid and test "
        "are multi-way: line *i* has the same English sentence in every `en-xx` pair, and no "
        "English valid/test sentence occurs in any training file. `make_bundled.py` keeps "
        "%d training pairs per language (both sides at most %d characters, sources: %s) and "
        "the first %d valid and %d test sentences."
        % (corpus_manifest.get("date", "?"), args.train_per_lang, args.max_chars,
           ", ".join(args.sources), args.n_valid, args.n_test),
        "",
        "## Counts",
        "",
        "| pair | train | valid | test |",
        "|---|---|---|---|",
    ]
    for pair, c in counts.items():
        lines.append("| %s | %d | %d | %d |" % (pair, c["train"]["total"], c["valid"]["total"],
                                               c["test"]["total"]))
    return "\n".join(lines) + "\n"


DEFAULT_NAME = "libreoffice-6pairs"


def attribution_name(name):
    """``ATTRIBUTION.md`` for the default archive, ``ATTRIBUTION-<name>.md`` for another (the seventh
    language's ``libreoffice-en-it``), so that one archive's run never replaces another's attribution."""
    return "ATTRIBUTION.md" if name == DEFAULT_NAME else "ATTRIBUTION-%s.md" % name


def options_string(args):
    return ("--name %s --langs %s --sources %s --train-per-lang %d --max-chars %d "
            "--n-valid %d --n-test %d" % (args.name, ",".join(args.langs), ",".join(args.sources),
                                          args.train_per_lang, args.max_chars, args.n_valid,
                                          args.n_test))


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--corpus", required=True, help="folder written by build_corpus.py --out")
    p.add_argument("--out", default="examples/data/bundled", help="output folder")
    p.add_argument("--name", default=DEFAULT_NAME,
                   help="archive name (<name>.tar.xz, top folder <name>/)")
    add_selection_options(p, sources=LIBREOFFICE_SOURCES)
    p.add_argument("--train-per-lang", type=int, default=4000, help="training pairs per language")
    p.add_argument("--max-chars", type=int, default=100,
                   help="longest training sentence (characters, each side)")
    p.add_argument("--n-valid", type=int, default=200, help="multi-way valid sentences")
    p.add_argument("--n-test", type=int, default=300, help="multi-way test sentences")
    p.add_argument("--max-bytes", type=int, default=3_000_000,
                   help="fail if the archive would be larger than this")
    args = p.parse_args(argv)
    parse_selection(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.corpus):
        raise UserError("corpus folder not found: %s" % args.corpus)
    if not os.path.isdir(os.path.join(args.corpus, "raw")):
        raise UserError("%s has no raw/ folder (run build_corpus.py --out %s first)"
                        % (args.corpus, args.corpus))
    manifest_path = os.path.join(args.corpus, "manifest.json")
    corpus_manifest = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            corpus_manifest = json.load(f)

    chosen, counts = select(args)
    files = {}
    for (split, lang), rows in sorted(chosen.items()):
        for side, column in (("en", 0), (lang, 1)):
            path = "%s/raw/%s" % (args.name, raw_name(split, lang, side))
            files[path] = "".join(r[column] + "\n" for r in rows).encode("utf-8")
    packages = {k: v.get("version") for k, v in sorted(corpus_manifest.get("packages", {}).items())
                if ("help" in args.sources and k.startswith("libreoffice-help-"))
                or ("ui" in args.sources and k.startswith("libreoffice-l10n-"))}
    small_manifest = {
        "name": args.name,
        "description": "bundled slice of the en<->xx corpus built by examples/data/build_corpus.py",
        "langs": args.langs,
        "sources": args.sources,
        "licence": "MPL-2.0 (LibreOffice)" if set(args.sources) <= set(LIBREOFFICE_SOURCES)
                   else "MPL-2.0 (LibreOffice); DDTP text under each package's licence",
        "options": options_string(args),
        "corpus_date": corpus_manifest.get("date"),
        "corpus_command": corpus_manifest.get("command"),
        "packages": packages,
        "counts": counts,
        "multiway": "valid and test: line i has the same English sentence in every en-xx pair",
        "sha256": {path.split("/", 1)[1]: hashlib.sha256(data).hexdigest()
                   for path, data in sorted(files.items())},
    }
    files["%s/manifest.json" % args.name] = (
        json.dumps(small_manifest, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")
    archive = tar_bytes(files)
    if len(archive) > args.max_bytes:
        raise UserError("archive would be %d bytes, over --max-bytes %d; lower --train-per-lang"
                        % (len(archive), args.max_bytes))
    archive_name = args.name + ".tar.xz"
    atomic_write(os.path.join(args.out, archive_name), archive)
    sha = hashlib.sha256(archive).hexdigest()
    text = attribution(args, corpus_manifest, counts, archive_name, sha, len(archive))
    atomic_write_text(os.path.join(args.out, attribution_name(args.name)), text)
    for pair, c in counts.items():
        print("%s: train %d, valid %d, test %d" % (pair, c["train"]["total"],
                                                  c["valid"]["total"], c["test"]["total"]))
    print("wrote %s (%d bytes, sha256 %s) and %s"
          % (os.path.join(args.out, archive_name), len(archive), sha, attribution_name(args.name)))
    return 0


if __name__ == "__main__":
    run_main(main)
