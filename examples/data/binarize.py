#!/usr/bin/env python3
"""Train a shared SentencePiece model and binarize parallel raw text of any language pairs for fairseq.

Input: ``RAW/{train,valid,test}.<src>-<tgt>.{<src>,<tgt>}`` for every pair, English-centric
(``en-de``, as written by ``build_corpus.py`` or found in the bundled archive) or not (``de-fr``);
``train`` is required, ``valid``/``test`` are optional.  Output in ``BIN``:

* ``spm.model`` / ``spm.vocab``: one unigram SentencePiece model trained on the training text of
  every language (byte fallback, so no text ever becomes ``<unk>``; identity normalisation, so
  decoded output keeps the references' characters, e.g. full-width Chinese punctuation);
* ``dict.txt`` and identical ``dict.<lang>.txt`` for every language (the SentencePiece
  vocabulary in fairseq's ``piece count`` format, without ``<unk> <s> </s> <pad>``);
* ``{split}.<src>-<tgt>.{<src>,<tgt>}.{bin,idx}`` from one ``fairseq-preprocess`` run per pair with
  ``--srcdict``/``--tgtdict`` set to that shared dictionary;
* ``raw/{valid,test}.<src>-<tgt>.{<src>,<tgt>}``: copies of the references for sacrebleu;
* ``spm/``: the piece-encoded text fed to fairseq-preprocess; ``binarize.json``: what was done
  (command, settings, tool versions, lines per pair and split, sha256 of every file above).

The layout is what fairseq's ``translation_multi_simple_epoch`` task reads; it finds the
reverse direction (``xx-en``, ``fr-de``) in the ``en-xx`` / ``de-fr`` files itself.  Stages whose outputs exist are
skipped (``--force`` redoes them). The SentencePiece training and the fairseq-preprocess runs live
in ``binarize_steps/``.

``--extend-from OLD_BIN`` adds pairs to a trained model's data instead (docs/add-language.md): the
new pairs are encoded with ``OLD_BIN``'s SentencePiece model and binarized against its dictionary
(both copied unchanged, so every old token keeps its id; the model's new language tag is appended
after them by fairseq's multilingual task, in ``--langs`` order), ``OLD_BIN``'s pairs are copied
byte for byte, and a new text that encodes to ``<unk>`` anywhere is refused. ``OLD_BIN`` is only read.

Examples::

    python examples/data/binarize.py --raw /tmp/taskmoe_corpus/raw --out /tmp/taskmoe_bin
    python examples/data/binarize.py --raw it_raw --out bin7 --extend-from bin6 --langs it
    python examples/data/binarize.py --raw my_raw --out my_bin --pairs de-fr,de-en   # my_raw/train.de-fr.de ...
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
from layout import SPLITS, pair_name  # noqa: E402
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


def discover(raw, langs=None, pairs=None):
    """Return {(src, tgt): [splits]} for the pairs whose ``train.<src>-<tgt>.{<src>,<tgt>}`` are in
    RAW: all of them, or the en-<xx> pairs of ``langs``, or ``pairs`` (``["de-fr", ...]``; a pair
    whose files are named the other way round, ``fr-de``, is taken as such). Raises UserError."""
    if not os.path.isdir(raw):
        raise UserError("raw text folder not found: %s" % raw)
    found = {}
    for name in os.listdir(raw):
        m = re.fullmatch(r"(train|valid|test)\.([A-Za-z_]+)-([A-Za-z_]+)\.\2", name)
        if m and m.group(2) != m.group(3) and os.path.isfile(os.path.join(raw, pair_name(*m.group(1, 2, 3), m.group(3)))):
            found.setdefault((m.group(2), m.group(3)), set()).add(m.group(1))
    if langs or pairs:
        wanted = [("en", l) for l in langs] if langs else [tuple(p.split("-")) for p in pairs]
        chosen = []
        for src, tgt in wanted:
            pair = (src, tgt) if "train" in found.get((src, tgt), ()) else (tgt, src)
            if "train" not in found.get(pair, ()):
                raise UserError("no training files for %s-%s in %s (expected train.%s-%s.{%s,%s})"
                                % (src, tgt, raw, src, tgt, src, tgt))
            if pair not in chosen:
                chosen.append(pair)
    else:
        chosen = sorted(p for p, s in found.items() if "train" in s)
        if not chosen:
            raise UserError("no train.<src>-<tgt>.{<src>,<tgt>} files in %s (e.g. train.en-de.en and train.en-de.de)" % raw)
    return {p: [s for s in SPLITS if s in found[p]] for p in chosen}


def load_pair(raw, split, pair, limit=None):
    """Return (source_lines, target_lines) of one split of ``pair``, checking they are parallel."""
    src, tgt = pair
    a = read_lines(os.path.join(raw, pair_name(split, src, tgt, src)), limit)
    b = read_lines(os.path.join(raw, pair_name(split, src, tgt, tgt)), limit)
    if len(a) != len(b):
        raise UserError("%s.%s-%s: %d %s lines but %d %s lines" % (split, src, tgt, len(a), src, len(b), tgt))
    return a, b


def languages(pairs):
    """Every language of ``pairs``, English first where it is one, then in order of appearance."""
    langs = list(dict.fromkeys(lang for pair in pairs for lang in pair))
    return sorted(langs, key=lambda lang: lang != "en")


# ----------------------------------------------------------------------------- what --force may replace

# the names binarize.py writes in --out (and, under raw/ and spm/, the text files named by raw_name)
OUTPUT_NAMES = re.compile(r"spm\.model|spm\.vocab|dict(\.[^./]+)?\.txt|binarize\.json|"
                          r"(train|valid|test)\.[A-Za-z_]+-[A-Za-z_]+\.[A-Za-z_]+\.(bin|idx)")
LEFTOVERS = re.compile(r"\.tmp-.*|\..*\.tmp")  # a killed run's scratch folders and temporary files
TEXT_NAMES = {"raw": re.compile(r"(valid|test)\.[A-Za-z_]+-[A-Za-z_]+\.[A-Za-z_]+|\..*\.tmp"),
              "spm": re.compile(r"(train|valid|test)\.[A-Za-z_]+-[A-Za-z_]+\.[A-Za-z_]+|\..*\.tmp")}


def remove_previous_outputs(out):
    """Remove a previous run's binarized outputs (binarize.py's own names) from ``out``, so that a run with
    other settings never leaves them beside its new dictionary."""
    for name in sorted(os.listdir(out)):
        if OUTPUT_NAMES.fullmatch(name) and name != "binarize.json" and os.path.isfile(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))


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


def check_no_unknown(sp, pieces, path):
    """Refuse (UserError, one line) text that the reused SentencePiece model encodes to ``<unk>``:
    with byte fallback nothing should; a model without it cannot take the new language."""
    unk = sp.id_to_piece(sp.unk_id())
    for number, line in enumerate(pieces, 1):
        if unk in line:
            raise UserError("%s line %d encodes to %s with the --extend-from SentencePiece model (it lacks byte "
                            "fallback): binarize all languages together instead" % (path, number, unk))


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
                   help="folder with {train,valid,test}.<src>-<tgt>.{<src>,<tgt>} (e.g. CORPUS/raw)")
    p.add_argument("--out", required=True, help="output folder for fairseq (BIN)")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="SentencePiece vocabulary size (lowered with a warning if the data is "
                        "too small)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--langs", default=None,
                       help="comma-separated non-English languages: their en-<xx> pairs (default: every pair in --raw)")
    which.add_argument("--pairs", default=None,
                       help="comma-separated pairs, any languages, e.g. de-fr,de-en (default: every pair in --raw)")
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
    p.add_argument("--extend-from", metavar="OLD_BIN", default=None,
                   help="a binarized folder (binarize.py's --out) whose SentencePiece model and dictionary the new pairs "
                        "reuse and whose pairs are copied unchanged: data for adding a language to its model "
                        "(docs/add-language.md); --vocab-size and the SentencePiece options do not apply")
    p.add_argument("--force", action="store_true",
                   help="redo every stage (refused where --out holds files binarize.py did not write)")
    args = p.parse_args(argv)
    args.langs = [l.strip() for l in args.langs.split(",") if l.strip()] if args.langs else None
    args.pairs = [q.strip() for q in args.pairs.split(",") if q.strip()] if args.pairs else None
    for pair in args.pairs or []:
        if not re.fullmatch(r"[A-Za-z_]+-[A-Za-z_]+", pair) or len(set(pair.split("-"))) != 2:
            p.error("--pairs entry %r is not of the form src-tgt with two languages (e.g. de-fr)" % pair)
    if args.max_train_per_pair is not None and args.max_train_per_pair < 1:
        p.error("--max-train-per-pair must be positive")
    if not 0 < args.character_coverage <= 1:
        p.error("--character-coverage must be in (0, 1]")
    return args


def read_extended(old_bin, out, pairs):
    """``OLD_BIN``'s ``binarize.json`` for ``--extend-from``; raises UserError (one line) when it is not a
    binarize.py folder, is ``--out`` itself, or already has one of the new ``pairs``."""
    meta_path = os.path.join(old_bin, "binarize.json")
    for path in (meta_path, os.path.join(old_bin, "spm.model"), os.path.join(old_bin, "dict.txt")):
        if not os.path.isfile(path):
            raise UserError("--extend-from %s has no %s: give the --out folder of an earlier binarize.py run"
                            % (old_bin, os.path.basename(path)))
    if os.path.realpath(old_bin) == os.path.realpath(out):
        raise UserError("--out %s is the --extend-from folder, which is never modified; choose a new --out" % out)
    with open(meta_path, encoding="utf-8") as f:
        old = json.load(f)
    have = set(old.get("lang_pairs", []))
    clash = ["%s-%s" % p for p in pairs if "%s-%s" % p in have or "%s-%s" % (p[1], p[0]) in have]
    if clash:
        raise UserError("--extend-from %s already has %s; --extend-from adds new pairs only" % (old_bin, ",".join(clash)))
    return old


def copy_extended(old_bin, old, out, force):
    """Copy ``OLD_BIN``'s SentencePiece model, dictionary, binarized pairs and references into ``out``
    unchanged; returns its pairs ``[(src, tgt)]`` and their line counts."""
    old_pairs = [tuple(p.split("-")) for p in old.get("lang_pairs", [])]
    names = ["spm.model", "spm.vocab", "dict.txt"]
    for pair in old_pairs:
        splits = [s for s in SPLITS if s in old.get("lines", {}).get("%s-%s" % pair, {})]
        names += [os.path.basename(p) for p in pair_outputs(old_bin, pair, splits)]
        names += [os.path.join("raw", pair_name(split, *pair, side)) for split in ("valid", "test") if split in splits
                  for side in pair]
    for name in names:
        src, dst = os.path.join(old_bin, name), os.path.join(out, name)
        if os.path.isfile(src) and (force or not os.path.exists(dst)):
            atomic_copy(src, dst)
    return old_pairs, old.get("lines", {})


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    pairs = discover(args.raw, args.langs, args.pairs)
    extended = read_extended(args.extend_from, args.out, pairs) if args.extend_from else None
    langs = languages(pairs)
    english_centric = all(src == "en" for src, _ in pairs)
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
    # en-xx data keeps its settings of before (the xx list), so existing outputs are reused
    selection = {"langs": [tgt for _, tgt in pairs]} if english_centric else {"pairs": ["%s-%s" % p for p in pairs]}
    settings = {"raw": os.path.abspath(args.raw), **selection,
                "vocab_size": args.vocab_size, "character_coverage": args.character_coverage,
                "max_train_per_pair": args.max_train_per_pair, "spm_sentences": args.spm_sentences}
    if extended is not None:  # the SentencePiece model and dictionary are OLD_BIN's
        settings = {"raw": os.path.abspath(args.raw), **selection, "max_train_per_pair": args.max_train_per_pair,
                    "extend_from": os.path.abspath(args.extend_from)}
    if old and old.get("settings") != settings:
        if not args.force:  # redoing part of it would leave the previous run's other outputs beside the new ones
            changed = sorted(key for key in settings if (old.get("settings") or {}).get(key) != settings[key])
            raise UserError("%s holds a previous run with other settings (%s); pass --force to replace its outputs, "
                            "or choose another --out" % (args.out, ", ".join(changed)))
        remove_previous_outputs(args.out)  # --force, checked by check_force: only binarize.py's own files are there
    force = bool(args.force)

    # ---- 1. SentencePiece model on all training text
    model_path = os.path.join(args.out, "spm.model")
    t = time.time()
    limit = args.max_train_per_pair
    old_pairs, old_lines = [], {}
    if extended is not None:
        old_pairs, old_lines = copy_extended(args.extend_from, extended, args.out, force)
        vocab, coverage = extended.get("spm", {}).get("vocab_size"), extended.get("spm", {}).get("coverage")
        log("[spm] reusing %s's SentencePiece model and dictionary (%s)" % (args.extend_from, ",".join(
            "%s-%s" % p for p in old_pairs)))
    elif force or not os.path.exists(model_path):
        lines, seen = [], set()
        for pair in pairs:
            first, second = load_pair(args.raw, "train", pair, limit)
            for line in first:  # the side pairs share (en of en-xx, de of de-fr and de-en): each sentence once
                if (pair[0], line) not in seen:
                    seen.add((pair[0], line))
                    lines.append(line)
            lines.extend(second)
            seen.update((pair[1], line) for line in second)
        log("[spm] training a %d-piece unigram model on %d lines (%s)"
            % (args.vocab_size, len(lines), ",".join(langs)))
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
    if extended is None and (force or not os.path.exists(dict_path)):
        n = write_fairseq_dict(sp, dict_path)
        log("[dict] wrote %s (%d pieces)" % (dict_path, n))

    # ---- 3. piece-encoded text
    spm_dir = os.path.join(args.out, "spm")
    counts = {}
    t = time.time()
    for pair, splits in pairs.items():
        key = "%s-%s" % pair
        counts[key] = {}
        for split in splits:
            n_lines = None
            for side in pair:
                dst = os.path.join(spm_dir, pair_name(split, *pair, side))
                if not force and os.path.exists(dst):
                    with open(dst, encoding="utf-8") as f:
                        n_lines = sum(1 for _ in f)
                    continue
                src = os.path.join(args.raw, pair_name(split, *pair, side))
                lines = read_lines(src, limit if split == "train" else None)
                pieces = sp.encode(lines, out_type=str, num_threads=max(1, args.workers))
                if extended is not None:
                    check_no_unknown(sp, pieces, src)
                atomic_write_lines(dst, (" ".join(p) for p in pieces))
                n_lines = len(lines)
            counts[key][split] = n_lines
    log("[encode] %s in %.1fs" % (", ".join("%s %s" % (p, "/".join(str(c[s]) for s in c))
                                            for p, c in counts.items()), time.time() - t))

    # ---- 4. fairseq-preprocess, one run per pair, shared dictionary
    jobs = [(pair, splits) for pair, splits in pairs.items()
            if force or not all(os.path.exists(p) for p in pair_outputs(args.out, pair, splits))]
    t = time.time()
    pre_stats = run_preprocess(args, jobs, dict_path, spm_dir)
    if jobs:
        log("[fairseq] %d pairs in %.1fs" % (len(jobs), time.time() - t))
    langs = languages(list(old_pairs) + [p for p in pairs if p not in old_pairs])
    for lang in langs:  # every language has the same dictionary file
        atomic_copy(dict_path, os.path.join(args.out, "dict.%s.txt" % lang))

    # ---- 5. raw references for scoring
    for pair, splits in pairs.items():
        for split in ("valid", "test"):
            if split in splits:
                for side in pair:
                    name = pair_name(split, *pair, side)
                    dst = os.path.join(args.out, "raw", name)
                    if force or not os.path.exists(dst):
                        atomic_copy(os.path.join(args.raw, name), dst)

    meta = {
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "settings": settings,
        "packages": package_versions(),
        "spm": {"model": "spm.model", "type": "unigram", "vocab_size": vocab, "coverage": coverage,
                "byte_fallback": True, "normalization": "identity", "split_digits": True},
        "dictionary": "dict.txt (copied to dict.<lang>.txt for " + ",".join(langs) + ")",
        "lang_pairs": ["%s-%s" % p for p in list(old_pairs) + list(pairs)],
        "lines": dict(old_lines, **counts),
        "preprocess": dict(old.get("preprocess", {}), **pre_stats),
        "fairseq_hint": "--task translation_multi_simple_epoch --langs %s --lang-pairs %s "
                        "--encoder-langtok tgt --decoder-langtok"
                        % (",".join(langs), ",".join("%s-%s,%s-%s" % (a, b, b, a) for a, b in list(old_pairs) + list(pairs))),
    }
    meta["sha256"] = checksums(args.out)
    atomic_write_text(meta_path, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    log("done: %s (%.1fs)" % (args.out, time.time() - t_start))
    return 0


if __name__ == "__main__":
    run_main(main)
