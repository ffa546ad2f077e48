"""Decoding an exported model with CTranslate2, optionally ranked exactly as fairseq ranks beams.

Two known differences in beam search (measured, see ``tests/test_export.py``), both in how the
finished beams are ranked, not in the network:

* CTranslate2 leaves the forced target prefix (the ``__de__`` tag) out of a hypothesis' score but
  divides by the full length; fairseq's ``SequenceGenerator`` includes the prefix's log-probability::

      fairseq score = (sum of token log-probs incl. prefix and </s>) / L
      ct2 score     = (the same sum without the prefix) / L          L = tokens incl. prefix and </s>

  so two finished beams of lengths L1 != L2 within ``|c| * |1/L1 - 1/L2|`` can swap places;
* at the length limit fairseq forces ``</s>`` and ranks the beam with that token's log-probability,
  CTranslate2 stops and ranks it without.

``fairseq_ranking=True`` asks CTranslate2 for all ``beam`` finished hypotheses, scores each as
fairseq would (one ``score_batch`` pass: prefix + pieces + ``</s>``, mean log-probability, i.e.
length penalty 1) and keeps the best, which reproduces fairseq's choice. With a trained model the
tag is predictable (``c`` close to 0) and the plain 1-best almost always agrees.
"""

from typing import Dict, List, Sequence

from taskmoe_fairseq.export.conventions import source_tokens, strip_output, target_prefix


def translate_pieces(
    translator,
    conv: Dict,
    pieces: Sequence[Sequence[str]],
    beam_size: int = 4,
    max_decoding_length: int = 200,
    fairseq_ranking: bool = False,
    max_input_length: int = 1024,
    **options,
) -> List[List[str]]:
    """Output pieces (tag stripped) for each sentence's SentencePiece ``pieces``.

    ``max_decoding_length`` counts the target prefix, so it equals fairseq's max length
    (``--max-len-a 0 --max-len-b N``); at that limit fairseq forces ``</s>`` and CTranslate2 stops.
    ``max_input_length``: CTranslate2 truncates longer sources (its default, 1024; 0: never), in
    decoding and in the re-scoring alike; ``taskmoe_fairseq.translate`` refuses them before.
    """
    sources = [source_tokens(conv, p) for p in pieces]
    prefix = target_prefix(conv)
    prefixes = [prefix] * len(sources) if prefix else None
    rerank = fairseq_ranking and beam_size > 1
    results = translator.translate_batch(
        sources, target_prefix=prefixes, beam_size=beam_size, max_decoding_length=max_decoding_length,
        num_hypotheses=beam_size if rerank else 1, max_input_length=max_input_length, **options,
    )
    if not rerank:
        return [strip_output(conv, r.hypotheses[0]) for r in results]
    candidates = [[list(h) for h in result.hypotheses] for result in results]
    flat_sources = [source for source, hyps in zip(sources, candidates) for _ in hyps]
    scored = iter(translator.score_batch(flat_sources, [h for hyps in candidates for h in hyps], max_input_length=max_input_length))
    chosen = []
    for hyps in candidates:
        scores = [sum(s.log_probs) / len(s.log_probs) for s in (next(scored) for _ in hyps)]
        best = max(range(len(hyps)), key=lambda i: scores[i])  # first of equals, as fairseq's stable sort
        chosen.append(strip_output(conv, hyps[best]))
    return chosen
