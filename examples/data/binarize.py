#!/usr/bin/env python3
"""Train a shared SentencePiece model and binarize en-xx raw text for fairseq.

Input: ``RAW/{train,valid,test}.en-<xx>.{en,<xx>}`` (as written by ``build_corpus.py`` or found
in the bundled archive).  Output in ``BIN``:

* ``spm.model`` / ``spm.vocab``: one unigram SentencePiece model trained on the training text of
  every language (byte fallback, so no text ever becomes ``<unk>``; identity normalisation, so
  decoded output keeps the references' characters, e.g. full-width Chinese punctuation);
* ``dict.txt`` and identical ``dict.<lang>.txt`` for ``en`` and every ``<xx>`` (the SentencePiece
  vocabulary in fairseq's ``piece count`` format, without ``<unk> <s> </s> <pad>``);
* ``{split}.en-<xx>.{en,<xx>}.{bin,idx}`` from one ``fairseq-preprocess`` run per pair with
  ``--srcdict``/``--tgtdict`` set to that shared dictionary;
* ``raw/{valid,test}.en-<xx>.{en,<xx>}``: detokenised copies of the references for sacrebleu;
* ``spm/``: the piece-encoded text fed to fairseq-preprocess; ``binarize.json``: what was done
  (command, settings, tool versions, lines per pair and split, sha256 of every file above).

The layout is what fairseq's ``translation_multi_simple_epoch`` task reads; it finds the
reverse direction (``xx-en``) in the ``en-xx`` files itself.  Stages whose outputs exist are
skipped (``--force`` redoes them). The SentencePiece training and the fairseq-preprocess runs live
in ``binarize_steps/``.

Example::

    python examples/data/binarize.py --raw /tmp/taskmoe_corpus/raw --out /tmp/taskmoe_bin
"""

import json
import os
import re
import shlex
import shutil
import sys
import time

from binarize_steps.fairseq_preprocess import pair_outputs, run_preprocess  # noqa: E402  (sibling modules)
from binarize_steps.sentencepiece_model import train_spm, write_fairseq_dict  # noqa: E402
from layout import SPLITS, raw_name  # noqa: E402
from script_support import (UserError, atomic_copy, atomic_write_lines, atomic_write_text, script_parser,  # noqa: E402
                            log, run_main, sha256_file, warn)


def read_lines(path, limit=None):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            out.append(" ".join(line.split()))  # same whitespace rule as the corpus builder
    return out


# ----------------------------------------------------------------------------- inputs


def discover(raw, langs):
    """Return {lang: [splits]} for the en-<lang> pairs present in RAW."""
    if not os.path.isdir(raw):
        raise UserError("raw text folder not found: %s" % raw)
    found = {}
    for name in os.listdir(raw):
        m = re.fullmatch(r"(train|valid|test)\.en-([A-Za-z_]+)\.en", name)
        if m and os.path.isfile(os.path.join(raw, raw_name(m.group(1), m.group(2), m.group(2)))):
            found.setdefault(m.group(2), set()).add(m.group(1))
    if langs:
        missing = [l for l in langs if "train" not in found.get(l, ())]
        if missing:
            raise UserError("no training files for %s in %s (expected train.en-%s.{en,%s})"
                            % (",".join("en-" + l for l in missing), raw, missing[0], missing[0]))
    else:
        langs = sorted(l for l, s in found.items() if "train" in s)
        if not langs:
            raise UserError("no train.en-<xx>.{en,<xx>} files in %s" % raw)
    return {l: [s for s in SPLITS if s in found[l]] for l in langs}


def load_pair(raw, split, lang, limit=None):
    """Return (en_lines, xx_lines) of one split, checking they are parallel."""
    en = read_lines(os.path.join(raw, raw_name(split, lang, "en")), limit)
    xx = read_lines(os.path.join(raw, raw_name(split, lang, lang)), limit)
    if len(en) != len(xx):
        raise UserError("%s.en-%s: %d English lines but %d %s lines" % (split, lang, len(en),
                                                                         len(xx), lang))
    return en, xx


# ----------------------------------------------------------------------------- what --force may replace

# the names binarize.py writes in --out (and, under raw/ and spm/, the text files named by raw_name)
OUTPUT_NAMES = re.compile(r"spm\.model|spm\.vocab|dict(\.[^./]+)?\.txt|binarize\.json|"
                          r"(train|valid|test)\.en-[A-Za-z_]+\.[A-Za-z_]+\.(bin|idx)")
LEFTOVERS = re.compile(r"\.tmp-.*|\..*\.tmp")  # a killed run's scratch folders and temporary files
TEXT_NAMES = {"raw": re.compile(r"(valid|test)\.en-[A-Za-z_]+\.[A-Za-z_]+|\..*\.tmp"),
              "spm": re.compile(r"(train|valid|test)\.en-[A-Za-z_]+\.[A-Za-z_]+|\..*\.tmp")}


def check_force(raw, out):
    """With --force, refuse (one line) an --out that holds the --raw input or anything binarize.py does
    not write: --force rewrites its own outputs, never someone else's files of the same names."""
    real_out, real_raw = os.path.realpath(out), os.path.realpath(raw)
    if real_raw == real_out or real_raw.startswith(real_out + os.sep):
        raise UserError("--out %s holds the --raw input %s, which is never modified; choose another --out"
                        % (out, raw))
    if not os.path.isdir(out):
        return
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if LEFTOVERS.fullmatch(name):
            continue
        if name in TEXT_NAMES and os.path.isdir(path) and not os.path.islink(path):
            foreign = [os.path.join(path, n) for n in sorted(os.listdir(path)) if not TEXT_NAMES[name].fullmatch(n)]
        else:
            foreign = [] if OUTPUT_NAMES.fullmatch(name) and not os.path.isdir(path) else [path]
        if foreign:
            raise UserError("--out %s holds %s, which binarize.py did not write; --force redoes only binarize.py's "
                            "own outputs: choose a new or empty folder" % (out, foreign[0]))


# ----------------------------------------------------------------------------- main


def package_versions():
    """Versions of what produced the files (the binarized format is fairseq's)."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in ("sentencepiece", "ve-fairseq", "fairseq", "torch", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def checksums(out):
    """sha256 of the model, dictionaries, binarized data and references (not the spm/ scratch text)."""
    files = {}
    for folder in ("", "raw"):
        for name in sorted(os.listdir(os.path.join(out, folder))):
            path = os.path.join(out, folder, name)
            if os.path.isfile(path) and not name.startswith(".") and name != "binarize.json":
                files[os.path.join(folder, name)] = sha256_file(path)
    return files


def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--raw", required=True,
                   help="folder with {train,valid,test}.en-<xx>.{en,<xx>} (e.g. CORPUS/raw)")
    p.add_argument("--out", required=True, help="output folder for fairseq (BIN)")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="SentencePiece vocabulary size (lowered with a warning if the data is "
                        "too small)")
    p.add_argument("--langs", default=None,
                   help="comma-separated non-English languages (default: every en-<xx> in --raw)")
    p.add_argument("--max-train-per-pair", type=int, default=None,
                   help="use only the first N training pairs of each language")
    p.add_argument("--workers", type=int, default=2, help="CPU processes/threads to use")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="SentencePiece character_coverage (rarer characters use byte fallback)")
    p.add_argument("--spm-sentences", type=int, default=1000000,
                   help="SentencePiece input_sentence_size (random sample of training lines)")
    p.add_argument("--fairseq-preprocess", default=None, metavar="COMMAND",
                   help="run this fairseq-preprocess command as a new process per pair (default: "
                        "fairseq's own, imported once and forked per pair)")
    p.add_argument("--force", action="store_true",
                   help="redo every stage (refused where --out holds files binarize.py did not write)")
    args = p.parse_args(argv)
    args.langs = [l.strip() for l in args.langs.split(",") if l.strip()] if args.langs else None
    if args.max_train_per_pair is not None and args.max_train_per_pair < 1:
        p.error("--max-train-per-pair must be positive")
    if not 0 < args.character_coverage <= 1:
        p.error("--character-coverage must be in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    pairs = discover(args.raw, args.langs)
    langs = list(pairs)
    if args.force:
        check_force(args.raw, args.out)
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    if args.fairseq_preprocess is not None and shutil.which(args.fairseq_preprocess) is None \
            and not os.path.exists(args.fairseq_preprocess):
        raise UserError(f"--fairseq-preprocess {args.fairseq_preprocess}: no such command")
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError("the sentencepiece Python package is missing (pip install sentencepiece)")

    meta_path = os.path.join(args.out, "binarize.json")
    old = {}
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
    settings = {"raw": os.path.abspath(args.raw), "langs": langs,
                "vocab_size": args.vocab_size, "character_coverage": args.character_coverage,
                "max_train_per_pair": args.max_train_per_pair, "spm_sentences": args.spm_sentences}
    force = bool(args.force or (old and old.get("settings") != settings))
    if force and old and not args.force:
        warn("settings differ from the previous run in %s; redoing every stage" % args.out)

    # ---- 1. SentencePiece model on all training text
    model_path = os.path.join(args.out, "spm.model")
    t = time.time()
    limit = args.max_train_per_pair
    if force or not os.path.exists(model_path):
        lines, seen_en = [], set()
        for lang in langs:
            en, xx = load_pair(args.raw, "train", lang, limit)
            for line in en:  # English appears once per pair: count each sentence once
                if line not in seen_en:
                    seen_en.add(line)
                    lines.append(line)
            lines.extend(xx)
        log("[spm] training a %d-piece unigram model on %d lines (%s)"
            % (args.vocab_size, len(lines), ",".join(["en"] + langs)))
        vocab, coverage = train_spm(args, lines, model_path)
        log("[spm] wrote %s (vocab %d, character_coverage %.4f) in %.1fs"
            % (model_path, vocab, coverage, time.time() - t))
        force = True  # everything downstream depends on the model
    else:
        vocab, coverage = old.get("spm", {}).get("vocab_size"), old.get("spm", {}).get("coverage")
        log("[spm] reusing %s" % model_path)
    sp = spm.SentencePieceProcessor(model_file=model_path)
    vocab = sp.get_piece_size()

    # ---- 2. fairseq dictionary shared by all languages
    dict_path = os.path.join(args.out, "dict.txt")
    if force or not os.path.exists(dict_path):
        n = write_fairseq_dict(sp, dict_path)
        log("[dict] wrote %s (%d pieces)" % (dict_path, n))

    # ---- 3. piece-encoded text
    spm_dir = os.path.join(args.out, "spm")
    counts = {}
    t = time.time()
    for lang in langs:
        counts["en-" + lang] = {}
        for split in pairs[lang]:
            n_lines = None
            for side in ("en", lang):
                dst = os.path.join(spm_dir, raw_name(split, lang, side))
                if not force and os.path.exists(dst):
                    with open(dst, encoding="utf-8") as f:
                        n_lines = sum(1 for _ in f)
                    continue
                src = os.path.join(args.raw, raw_name(split, lang, side))
                lines = read_lines(src, limit if split == "train" else None)
                pieces = sp.encode(lines, out_type=str, num_threads=max(1, args.workers))
                atomic_write_lines(dst, (" ".join(p) for p in pieces))
                n_lines = len(lines)
            counts["en-" + lang][split] = n_lines
    log("[encode] %s in %.1fs" % (", ".join("%s %s" % (p, "/".join(str(c[s]) for s in c))
                                            for p, c in counts.items()), time.time() - t))

    # ---- 4. fairseq-preprocess, one run per pair, shared dictionary
    jobs = [(lang, pairs[lang]) for lang in langs
            if force or not all(os.path.exists(p) for p in pair_outputs(args.out, lang, pairs[lang]))]
    t = time.time()
    pre_stats = run_preprocess(args, jobs, dict_path, spm_dir)
    if jobs:
        log("[fairseq] %d pairs in %.1fs" % (len(jobs), time.time() - t))
    for lang in ["en"] + langs:  # every language has the same dictionary file
        atomic_copy(dict_path, os.path.join(args.out, "dict.%s.txt" % lang))

    # ---- 5. raw references for scoring
    for lang in langs:
        for split in ("valid", "test"):
            if split in pairs[lang]:
                for side in ("en", lang):
                    name = raw_name(split, lang, side)
                    dst = os.path.join(args.out, "raw", name)
                    if force or not os.path.exists(dst):
                        atomic_copy(os.path.join(args.raw, name), dst)

    meta = {
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "settings": settings,
        "packages": package_versions(),
        "spm": {"model": "spm.model", "type": "unigram", "vocab_size": vocab, "coverage": coverage,
                "byte_fallback": True, "normalization": "identity", "split_digits": True},
        "dictionary": "dict.txt (copied to dict.<lang>.txt for en," + ",".join(langs) + ")",
        "lang_pairs": ["en-" + l for l in langs],
        "lines": counts,
        "preprocess": dict(old.get("preprocess", {}), **pre_stats),
        "fairseq_hint": "--task translation_multi_simple_epoch --langs en,%s --lang-pairs %s "
                        "--encoder-langtok tgt --decoder-langtok"
                        % (",".join(langs), ",".join("en-%s,%s-en" % (l, l) for l in langs)),
    }
    meta["sha256"] = checksums(args.out)
    atomic_write_text(meta_path, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    log("done: %s (%.1fs)" % (args.out, time.time() - t_start))
    return 0


if __name__ == "__main__":
    run_main(main)
