"""Step 4, split: multi-way valid/test sets and a hash-ordered training set.

Reads the clean pairs that ``corpus.clean`` returns. Writes ``OUT/raw/{train,valid,test}.en-<xx>.
{en,<xx>}`` (parallel lines) and ``OUT/meta/<split>.en-<xx>.source`` (the source of every line).

valid and test are multi-way: English sentences (of at least ``min_eval_words`` words) that a
LibreOffice source translates into every language, grouped by a normalised key (case and
punctuation removed) and ordered by a hash of that key; the first ``n_test`` keys are test, the
next ``n_valid`` valid, in the same order in every ``en-xx`` file. Every pair whose English has a
valid/test key is kept out of training, in all languages; the rest is training, ordered by a hash
of the pair. Nothing depends on the order of the input files or on a random seed.
Entry point: ``split_corpus``.
"""

import collections
import hashlib
import os
import re

from layout import LIBREOFFICE_SOURCES, SOURCES, SPLITS, raw_name
from script_support import UserError, atomic_write_lines, log


def english_key(en):
    """Normalised English used for the split: case and punctuation variants share one key."""
    return " ".join(re.sub(r"[\W_]+", " ", en.casefold()).split())


def hash_of(text):
    """The stable order used for the split (sha1 hex of the UTF-8 text)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def choose_eval_keys(clean, langs, options):
    """Return (eval_keys, keys, by_en): ``eval_keys[split]`` the ordered keys of valid and test,
    ``keys[key]`` the English strings of a key, ``by_en[lang][en]`` a Counter of the (xx, source)
    translations of ``en`` from LibreOffice sources."""
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
        if len(en.split()) >= options.min_eval_words:
            keys.setdefault(english_key(en), []).append(en)
    ordered = sorted(keys, key=hash_of)
    log("[split] %d English sentences are translated into all of %s (%d usable keys)"
        % (len(common), ",".join(langs), len(ordered)))
    if len(ordered) < options.n_test + options.n_valid:
        raise UserError("only %d multi-way sentences, fewer than --n-test + --n-valid = %d"
                        % (len(ordered), options.n_test + options.n_valid))
    eval_keys = {"test": ordered[:options.n_test],
                 "valid": ordered[options.n_test:options.n_test + options.n_valid]}
    return eval_keys, keys, by_en


def _pick(counter):
    """The most frequent translation; ties: help before ui, then lexicographic."""
    return min(counter, key=lambda k: (-counter[k], SOURCES.index(k[1]), k[0]))


def split_corpus(out, clean, langs, sources, options):
    """Write OUT/raw and OUT/meta; return (counts, held_out_from_train, multiway_available)."""
    eval_keys, keys, by_en = choose_eval_keys(clean, langs, options)
    held_out = set(eval_keys["test"]) | set(eval_keys["valid"])
    counts, leaked = {}, 0
    for lang in langs:
        pair = "en-" + lang
        rows = {}
        for split in ("valid", "test"):
            rows[split] = []
            for key in eval_keys[split]:
                en = keys[key][0]
                xx, source = _pick(by_en[lang][en])
                rows[split].append((en, xx, source))
        train = [(en, xx, source) for (en, xx), source in clean[lang].items()
                 if english_key(en) not in held_out]
        leaked += len(clean[lang]) - len(train)
        train.sort(key=lambda r: hash_of(r[0] + "\t" + r[1]))
        rows["train"] = train
        counts[pair] = {}
        for split in SPLITS:
            rs = rows[split]
            atomic_write_lines(os.path.join(out, "raw", raw_name(split, lang, "en")),
                               [r[0] for r in rs])
            atomic_write_lines(os.path.join(out, "raw", raw_name(split, lang, lang)),
                               [r[1] for r in rs])
            atomic_write_lines(os.path.join(out, "meta", "%s.%s.source" % (split, pair)),
                               [r[2] for r in rs])
            by_source = collections.Counter(r[2] for r in rs)
            counts[pair][split] = {"total": len(rs)}
            counts[pair][split].update({s: by_source.get(s, 0) for s in sources})
        log("[split] %s: train %d, valid %d, test %d" % (
            pair, len(rows["train"]), len(rows["valid"]), len(rows["test"])))
    log("[split] %d pairs whose English matches a valid/test sentence were kept out of train"
        % leaked)
    return counts, leaked, len(keys)
