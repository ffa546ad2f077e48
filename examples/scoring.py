"""Scoring and fairseq-generate output for the example scripts (quickstart.py, paper_table1.py):
the one home of which sacrebleu tokenizer scores BLEU in which target language, and of how a
fairseq-generate results file is read.

* :func:`bleu_metric` / :func:`chrf_metric`: sacrebleu metric objects (``sacrebleu.metrics.BLEU``,
  ``CHRF``); :func:`score` returns BLEU and chrF with their sacrebleu signatures, which the
  scripts print beside every score.
* :func:`generate_args` / :func:`read_hypotheses`: fairseq-generate writes its own results file
  (``--results-path DIR`` -> ``DIR/generate-<subset>.txt``) and decodes SentencePiece itself
  (``--bpe sentencepiece --sentencepiece-model spm.model``: its ``D-<id>`` lines are
  ``SentencePieceProcessor.decode`` of the pieces, byte-fallback pieces included, which fairseq's
  ``--post-process sentencepiece`` string replacement would leave as ``<0xE6>``); the language
  tag is already stripped (the task's ``symbols_to_strip_from_output``).
* :func:`degeneracy`: the share of identical and of repeating hypotheses, for warnings.
* :func:`sentence_statistics` / :func:`resampled_scores`: paired bootstrap resampling (Koehn
  2004, the statistics of sacrebleu's ``--paired-bs``) for paper_table1.py and learning_curves.py.
"""

import os
import re
from collections import Counter

# sacrebleu's BLEU tokenizer per target language: Chinese by character ('zh'), Japanese by
# character ('char'; 'ja-mecab' needs MeCab installed), everything else sacrebleu's default '13a'.
# chrF needs no tokenizer (character n-grams, sacrebleu's defaults: chrF2, n = 6).
BLEU_TOKENIZE = {"zh": "zh", "ja": "char"}


def bleu_tokenize(target_lang):
    """The sacrebleu tokenizer name for BLEU on text in ``target_lang``."""
    return BLEU_TOKENIZE.get(target_lang, "13a")


def bleu_metric(target_lang):
    """A ``sacrebleu.metrics.BLEU`` for ``target_lang`` (its tokenizer from :data:`BLEU_TOKENIZE`)."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=bleu_tokenize(target_lang))


def chrf_metric():
    """A ``sacrebleu.metrics.CHRF`` with sacrebleu's defaults (chrF2, character 6-grams)."""
    from sacrebleu.metrics import CHRF

    return CHRF()


def score(hypotheses, references, target_lang):
    """Corpus BLEU and chrF of detokenised ``hypotheses`` against one reference each.

    Returns ``{"bleu", "chrf", "bleu_signature", "chrf_signature"}`` (scores 0-100, signatures as
    sacrebleu prints them, e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``)."""
    bleu, chrf = bleu_metric(target_lang), chrf_metric()
    return {
        "bleu": bleu.corpus_score(hypotheses, [references]).score,
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def sentence_statistics(metric, hypotheses, references):
    """sacrebleu's per-sentence sufficient statistics of ``metric`` (a :func:`bleu_metric` or
    :func:`chrf_metric`), ``[sentences, stats]``: summed over any subset of rows they give that
    subset's corpus score (:func:`resampled_scores`)."""
    import numpy as np

    return np.array(metric._extract_corpus_statistics(hypotheses, [references]))


def resampled_scores(metric, statistics, resamples):
    """Corpus scores of ``metric`` on each resample: ``statistics`` from :func:`sentence_statistics`,
    ``resamples`` ``[samples, sentences]`` sentence indices (drawn with replacement; shared by every
    system and direction compared, which makes the bootstrap paired). Returns ``[samples]``."""
    import numpy as np

    return np.array([metric._compute_score_from_stats(statistics[index].sum(0)).score for index in resamples])


def signatures(target_langs):
    """``{"bleu": {tokenize: signature}, "chrf": signature}`` for a set of target languages: what a
    table's footnote prints once instead of one signature per cell."""
    def signature(metric):  # sacrebleu states nrefs only once a metric has scored: one reference here
        metric.corpus_score(["x"], [["x"]])
        return str(metric.get_signature())

    bleu = {}
    for lang in sorted(set(target_langs)):
        bleu.setdefault(bleu_tokenize(lang), signature(bleu_metric(lang)))
    return {"bleu": bleu, "chrf": signature(chrf_metric())}


def signature_lines(target_langs):
    """The signatures of :func:`signatures` as markdown/terminal lines."""
    target_langs = list(target_langs)  # read twice below; callers pass generators
    sig = signatures(target_langs)
    langs_of = {}
    for lang in sorted(set(target_langs)):
        langs_of.setdefault(bleu_tokenize(lang), []).append(lang)
    lines = [f"BLEU ({', '.join(langs_of[tok])}): `{text}`" for tok, text in sig["bleu"].items()]
    return lines + [f"chrF (all): `{sig['chrf']}`"]


def generate_args(spm_model, results_path):
    """fairseq-generate options that make it write its own results file, decoded to text."""
    return ["--bpe", "sentencepiece", "--sentencepiece-model", spm_model, "--results-path", results_path]


def read_hypotheses(results_path, subset="test", expected=None):
    """The detokenised hypotheses (``D-<id>`` lines) of ``results_path/generate-<subset>.txt`` in
    sentence order.

    Raises ``ValueError`` naming the file when the ids are not exactly ``0 .. expected - 1``."""
    path = os.path.join(results_path, f"generate-{subset}.txt")
    hypotheses = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("D-"):
                head, _score, *text = line.rstrip("\n").split("\t", 2)
                hypotheses[int(head[2:])] = text[0] if text else ""
    count = len(hypotheses) if expected is None else expected
    if sorted(hypotheses) != list(range(count)):
        raise ValueError(f"{path} holds {len(hypotheses)} hypotheses, expected ids 0..{count - 1}")
    return [hypotheses[i] for i in range(count)]


def generation_speed(log_text):
    """fairseq-generate's target tokens/s from its log (``Translated N sentences (T tokens) in S s
    (... sentences/s, X tokens/s)``; the log goes to the process's output, not the results file,
    because the plugin's import has configured logging already); None when absent."""
    match = re.search(r"Translated .*\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", log_text)
    return float(match.group(2)) if match else None


def degeneracy(hypotheses):
    """How degenerate a list of hypotheses is: ``{"most_common_share", "repeating_share",
    "empty_share"}`` (shares 0-1). A hypothesis repeats when one word (or, for unspaced text, one
    4-character string) makes up at least half of it and occurs at least 3 times."""
    if not hypotheses:
        return {"most_common_share": 0.0, "repeating_share": 0.0, "empty_share": 0.0}
    most_common = Counter(hypotheses).most_common(1)[0][1]

    def repeats(text):
        units = text.split()
        if len(units) < 3:
            units = [text[i:i + 4] for i in range(0, max(len(text) - 3, 0), 4)]
        if len(units) < 3:
            return False
        count = Counter(units).most_common(1)[0][1]
        return count >= 3 and count * 2 >= len(units)

    n = len(hypotheses)
    return {"most_common_share": most_common / n,
            "repeating_share": sum(repeats(h) for h in hypotheses) / n,
            "empty_share": sum(not h.strip() for h in hypotheses) / n}
