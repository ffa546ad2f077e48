#!/usr/bin/env python3
"""Build an English <-> {de, fr, es, ru, ja, zh} corpus of human translations from Debian packages.

Sources (all fetched with ``apt-get`` and unpacked with ``dpkg-deb -x``; nothing else is needed):

* ``help``: LibreOffice offline help, ``libreoffice-help-{en-us,de,fr,es,ru,ja,zh-cn}`` (MPL-2.0),
  paragraphs aligned by their shared ``id="par_id..."`` in the same HTML page;
* ``ui``: LibreOffice interface catalogs, ``libreoffice-l10n-{de,fr,es,ru,ja,zh-cn}`` (MPL-2.0),
  gettext ``.mo`` files: msgid (English) -> msgstr;
* ``ddtp``: Debian package-description translations (each under its package's licence), apt's
  ``Translation-<lang>`` indexes matched on ``Description-md5``.

This script runs the steps of the ``corpus/`` package in order (each module's docstring says what
it reads and writes; each step is skipped when its outputs exist; ``--force`` redoes steps 2-5,
``--refresh-downloads`` also step 1):

1. ``corpus/fetch.py``: ``apt-get update`` into a private ``CACHE/apt-lists``, ``apt-get
   download`` into ``CACHE/debs``, ``dpkg-deb -x`` into ``CACHE/extract``;
2. ``corpus/sources/``: candidate pairs per source -> ``OUT/pairs/<source>.en-<xx>.tsv``;
3. ``corpus/clean.py``: cleaning rules and de-duplication;
4. ``corpus/split.py``: multi-way valid/test sets and a hash-ordered training set ->
   ``OUT/raw/{train,valid,test}.en-<xx>.{en,<xx>}`` and ``OUT/meta/<split>.en-<xx>.source``;
5. ``corpus/manifest.py``: ``OUT/manifest.json`` (packages, checksums, counts);
6. ``binarize.py``: one shared SentencePiece model and ``fairseq-preprocess`` into ``OUT/bin``
   (``--bin`` moves it, ``--no-binarize`` stops after step 5).

Example (everything, about 2 minutes on 2 cores)::

    python examples/data/build_corpus.py --out /tmp/taskmoe_corpus
    fairseq-train /tmp/taskmoe_corpus/bin --user-dir taskmoe_fairseq ...
"""

import json
import os
import time

import binarize  # noqa: E402  (sibling module)
from corpus import clean, fetch, manifest, split
from corpus.sources import extract_all
from layout import LIBREOFFICE_SOURCES, add_selection_options, parse_selection
from script_support import log, run_main, script_parser


# The options that decide the corpus besides --langs and --sources (name, default, help); manifest.json
# records them in this order under "config", and a build with other values is not reused.
CORPUS_OPTIONS = (
    ("n_test", 500, "multi-way test sentences"),
    ("n_valid", 500, "multi-way valid sentences"),
    ("max_chars", 200, "maximum characters per side"),
    ("min_words", 2, "minimum English words (drops one-word labels)"),
    ("min_eval_words", 4, "minimum English words of a valid/test sentence"),
    ("max_placeholders", 1, "drop strings with more placeholders (%%s, %%1, $1, {0}, ...) than this"),
)


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--out", required=True, help="output folder (raw/, meta/, pairs/, manifest.json)")
    p.add_argument("--cache", default=None,
                   help="download cache (apt lists, .debs, unpacked trees); default OUT/cache")
    add_selection_options(p)
    for name, default, text in CORPUS_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=text)
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
    parse_selection(p, args)
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


def already_built(manifest_path, out, config):
    """True when OUT/manifest.json was written with the same options and all its files exist."""
    if not os.path.exists(manifest_path):
        return False
    with open(manifest_path, encoding="utf-8") as f:
        old = json.load(f)
    done = all(os.path.exists(os.path.join(out, f)) for f in old.get("sha256", {}))
    return old.get("config") == config and done


def build(args):
    """Steps 1-5: the raw corpus and its manifest."""
    t0 = time.time()
    args.out = os.path.abspath(args.out)
    cache = os.path.abspath(args.cache or os.path.join(args.out, "cache"))
    langs, sources = args.langs, args.sources
    config = {"langs": langs, "sources": sources, **{name: getattr(args, name) for name, _, _ in CORPUS_OPTIONS}}
    manifest_path = os.path.join(args.out, "manifest.json")
    if not args.force and already_built(manifest_path, args.out, config):
        log("corpus already built in %s (manifest.json exists; --force to rebuild)" % args.out)
        return 0
    fetch.check_tools()
    os.makedirs(args.out, exist_ok=True)
    pkg_info, lists_dir = fetch.fetch_sources(cache, langs, sources, args.refresh_downloads)

    t = time.time()
    extract_all(args.out, langs, sources, pkg_info, lists_dir, args.force)
    log("[pairs] done in %.1fs" % (time.time() - t))
    t = time.time()
    pairs, dropped, candidates = clean.clean_corpus(args.out, langs, sources, args)
    counts, held_out, multiway = split.split_corpus(args.out, pairs, langs, sources, args)
    log("[split] done in %.1fs" % (time.time() - t))

    stats = {"counts": counts, "candidate_pairs": candidates, "dropped": dropped,
             "held_out_from_train": held_out, "multiway_sentences_available": multiway}
    manifest.write_manifest(manifest_path, args.out, config, pkg_info, lists_dir, stats)
    log("wrote %s (total %.1fs)" % (manifest_path, time.time() - t0))
    return 0


if __name__ == "__main__":
    run_main(main)
