"""What a translation request asks of the model, with no HTTP in it.

:class:`TranslationService` checks a request (pair, texts, beam, length) and translates it with
the pair's sub-network: the :class:`ExpertSetStore` loads it on first use, and the text goes
through the same code as ``python -m taskmoe_fairseq.translate`` (fairseq's hub interface: the
SentencePiece model splits the text, the task adds the language tags, fairseq's generator
decodes, :func:`taskmoe_fairseq.translate.translate_lines` orders, batches and detokenizes).
Every problem with a request is a :class:`~taskmoe_fairseq.errors.TaskMoeError` with one line
that names no server file (it is the client's answer).
"""

import copy
import re
from typing import List, Optional, Sequence

from fairseq.dataclass.utils import open_dict

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel  # noqa: F401  (registers the model)
from taskmoe_fairseq.serve.expert_sets import ExpertSetStore
from taskmoe_fairseq.serve.pair_model import build_pair_model, expert_set_key
from taskmoe_fairseq.serve.shared_weights import SharedWeights

PAIR_PATTERN = re.compile(r"[^\s-]+-[^\s-]+")


def check_pairs(weights: SharedWeights, pairs: Sequence[str]) -> List[str]:
    """The pairs to serve: each of the model's languages, with a sub-network (a zero-shot pair only
    where no extracted layer routes by pair; an extracted checkpoint: its own pair)."""
    langs = list(weights.router.langs)
    out = []
    for pair in pairs:
        parts = pair.split("-")
        if not PAIR_PATTERN.fullmatch(pair) or parts[0] == parts[1] or not all(lang in langs for lang in parts):
            raise usage_error(f"--lang-pairs: unknown language pair {pair}; the model knows {','.join(weights.known_pairs)} "
                              f"(languages {','.join(langs)})")
        if weights.extracted_pair and pair != weights.extracted_pair:
            raise usage_error(f"--lang-pairs: {weights.path} is the {weights.extracted_pair} sub-network; it cannot serve {pair} "
                              "(serve the full checkpoint)")
        if pair not in weights.known_pairs and any(r.endswith("pair") for _, _, r in weights.layers):
            raise usage_error(f"--lang-pairs: {pair} is not a training pair and the model routes by language pair (its gate "
                              f"never saw {pair}); serve some of {','.join(weights.known_pairs)}")
        if pair not in out:
            out.append(pair)
    return out


class TranslationService:
    """Pairs, limits and the translation of one batch of texts for one pair.

    Args:
        weights: the checkpoint's :class:`SharedWeights`.
        pairs: the pairs to serve (default: the checkpoint's training pairs).
        max_expert_sets: expert sets kept loaded (LRU beyond).
        max_len_b: at most N output tokens (fairseq's ``--max-len-a 0 --max-len-b N``); also the largest a request may ask.
        max_beam, max_texts: the largest beam and number of texts a request may ask.
        batch_size: sentences per forward.
    """

    def __init__(self, weights: SharedWeights, pairs: Optional[Sequence[str]] = None, max_expert_sets: int = 4,
                 max_len_b: int = 200, max_beam: int = 8, max_texts: int = 64, batch_size: int = 64):
        self.weights = weights
        self.pairs = check_pairs(weights, pairs or weights.known_pairs)
        self.max_len_b, self.max_beam, self.max_texts, self.batch_size = max_len_b, max_beam, max_texts, batch_size
        self.cfg = copy.deepcopy(weights.cfg)
        with open_dict(self.cfg):
            self.cfg.dataset.max_tokens = None  # our batches are the batches (as translate.load_fairseq sets them)
            self.cfg.dataset.batch_size = None
        self.store = ExpertSetStore(lambda pair: build_pair_model(weights, pair), self._translator,
                                    lambda pair: expert_set_key(weights, pair), max_expert_sets)
        self.dictionary = weights.task.source_dictionary
        from fairseq.data import encoders

        self.bpe = encoders.build_bpe(self.cfg.bpe)
        # the task prepends the language tag: the source may hold max_source_positions - 1 tokens, </s> included
        self.max_source_tokens = int(weights.args.max_source_positions) - 1

    def _translator(self, pair: str, model):
        from taskmoe_fairseq.models.hub_interface import TaskMoeHubInterface
        from taskmoe_fairseq.translate import FairseqTranslator

        hub = TaskMoeHubInterface(self.cfg, self.weights.pair_task(pair), [model])
        hub.to(self.weights.device).eval()  # the hub moves each batch to its parameters' device
        return FairseqTranslator(hub)

    def source_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model sees them (SentencePiece pieces and ``</s>``, as the hub encodes)."""
        return self.dictionary.encode_line(self.bpe.encode(text), add_if_not_exist=False).numel()

    def check(self, pair, texts, beam, max_len_b) -> int:
        """The request's cost: ``beam`` x the sum over its texts of (source tokens + ``max_len_b``), i.e. the
        most tokens its beams may hold (an empty text: 0).

        Raises:
            TaskMoeError: (one line) a request the server cannot translate.
        """
        if not isinstance(pair, str) or pair not in self.pairs:
            raise usage_error(f"unknown lang_pair {pair!r:.60}; this server translates {', '.join(self.pairs)}")
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise usage_error('"texts" must be a list of strings')
        if not texts:
            raise usage_error('"texts" is empty; send at least one text')
        if len(texts) > self.max_texts:
            raise usage_error(f'"texts" has {len(texts)} texts; at most {self.max_texts} per request (split the request)')
        for name, value, largest in (("beam", beam, self.max_beam), ("max_len_b", max_len_b, self.max_len_b)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
                raise usage_error(f'"{name}" must be an integer from 1 to {largest} (got {value!r:.60})')
        for number, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate (JSON's "\\ud800" escape): not text
                raise usage_error(f"texts[{number}] is not valid Unicode ({error.reason} at character {error.start}); "
                                  "send UTF-8 text") from None
        cost = 0
        for number, text in enumerate(texts):
            tokens = self.source_tokens(text) if text.strip() else 0
            if tokens > self.max_source_tokens:
                raise usage_error(f"texts[{number}] has {tokens} tokens; the model takes at most {self.max_source_tokens} "
                                  "(split the text)")
            cost += beam * (tokens + max_len_b) if tokens else 0
        return cost

    def translate(self, pair: str, texts: List[str], beam: int, max_len_b: int, on_batch=None) -> List[str]:
        """Detokenized translations of ``texts`` (checked with :meth:`check` first), in order; ``on_batch(n)``
        after each batch of ``n`` sentences (``translate_lines``'s hook; it may raise to stop).

        Raises:
            CheckpointChanged: the pair's experts are not loaded and the checkpoint's content changed on disk.
        """
        from taskmoe_fairseq.translate import translate_lines

        translator = self.store.translator(pair)
        return translate_lines(translator, texts, beam=beam, max_len_b=max_len_b, batch_size=self.batch_size,
                               on_batch=on_batch)
