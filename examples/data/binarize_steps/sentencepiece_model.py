"""binarize.py's first step: the shared SentencePiece model and the fairseq dictionary made from it.

``train_spm`` reads training lines (given in memory) and writes ``BIN/spm.model`` and
``BIN/spm.vocab`` (unigram, byte fallback, identity normalisation, digits split), fitting the
vocabulary size and character set to the data with a warning when SentencePiece refuses them;
``write_fairseq_dict`` writes ``BIN/dict.txt`` (the SentencePiece vocabulary in fairseq's
``piece count`` format, without ``<unk> <s> </s>``).
"""

import os
import re
import shutil
import tempfile

from script_support import UserError, atomic_move, atomic_write_lines, warn

META_PIECES = 3 + 256  # <unk> <s> </s> + byte-fallback pieces


def keep_frequent_chars(lines, budget):
    """Remove from ``lines`` every character outside the ``budget`` most frequent ones.

    Used only for the SentencePiece training text when the vocabulary is too small to hold a
    piece for every character that ``character_coverage`` asks for (SentencePiece refuses a
    coverage below 0.98): the removed characters get no piece of their own and are encoded
    with byte fallback.
    """
    counts = {}
    for line in lines:
        for ch in line:
            if ch != " ":
                counts[ch] = counts.get(ch, 0) + 1
    keep = set(sorted(counts, key=lambda c: (-counts[c], c))[:max(budget, 1)])
    keep.add(" ")
    out = []
    for line in lines:
        line = "".join(ch for ch in line if ch in keep)
        line = " ".join(line.split())
        if line:
            out.append(line)
    return out, len(counts)


def train_spm(args, lines, model_path):
    """Train the shared unigram model; fit the vocabulary size and character set to the data."""
    import sentencepiece as spm

    vocab, coverage = args.vocab_size, args.character_coverage
    if vocab < META_PIECES + 20:
        raise UserError("--vocab-size %d is too small: byte fallback alone needs %d pieces; "
                        "use at least %d" % (vocab, META_PIECES, META_PIECES + 20))
    workdir = tempfile.mkdtemp(dir=args.out, prefix=".tmp-spm.")
    text = os.path.join(workdir, "train.txt")

    def write_text(text_lines):
        try:
            with open(text, "w", encoding="utf-8") as f:
                for line in text_lines:
                    f.write(line + "\n")
        except OSError as error:
            raise OSError(error.errno, error.strerror, text) from None  # name the file (run_main's one line)

    try:
        write_text(lines)
        for _attempt in range(6):
            prefix = os.path.join(workdir, "spm")
            try:
                spm.SentencePieceTrainer.train(
                    input=text, model_prefix=prefix, model_type="unigram", vocab_size=vocab,
                    character_coverage=coverage, byte_fallback=True, split_digits=True,
                    normalization_rule_name="identity", input_sentence_size=args.spm_sentences,
                    shuffle_input_sentence=True, seed_sentencepiece_size=200000,
                    num_threads=max(1, args.workers), minloglevel=2)
                break
            except RuntimeError as e:
                msg = str(e)
                too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a "
                                     r"value <= (\d+)", msg)
                too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
                if too_high:
                    new = int(too_high.group(2))
                    warn("vocabulary size %d is too large for this data; using %d" % (vocab, new))
                    vocab = new
                elif too_small:
                    budget = (vocab - META_PIECES) // 2
                    lines, n_chars = keep_frequent_chars(lines, budget)
                    warn("vocabulary size %d is too small for the %d characters that coverage "
                         "%.4f needs; only the %d most frequent of %d characters get pieces, the "
                         "others use byte fallback" % (vocab, int(too_small.group(2)) - META_PIECES,
                                                       coverage, budget, n_chars))
                    write_text(lines)
                else:
                    line = msg.strip().splitlines()[-1] if msg.strip() else repr(e)
                    raise UserError("sentencepiece training failed: %s" % line)
        else:
            raise UserError("sentencepiece training failed: could not fit --vocab-size %d to the "
                            "data; try another value" % args.vocab_size)
        atomic_move(prefix + ".vocab", model_path[:-len(".model")] + ".vocab")
        atomic_move(prefix + ".model", model_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return vocab, coverage


def write_fairseq_dict(sp, path):
    """fairseq dictionary from the SentencePiece vocabulary (control and unk pieces left out)."""
    rows = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        piece = sp.id_to_piece(i)
        if not piece or any(c.isspace() for c in piece):
            continue  # cannot happen with whitespace-normalised input; keep the format valid
        rows.append("%s 1" % piece)
    atomic_write_lines(path, rows)
    return len(rows)
