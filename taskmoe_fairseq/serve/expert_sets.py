"""The loaded expert sets: at most ``max_sets`` pair sub-networks, least recently used evicted.

An entry is one :func:`~taskmoe_fairseq.serve.pair_model.build_pair_model` result (the
model for one :data:`ExpertSetKey`, i.e. one set of tasks in the extracted layers) and a
translator per pair it has served (fairseq's hub interface around the shared model, one task per
pair). Evicting an entry drops its experts; the shared tensors stay, since ``SharedWeights`` owns
them. Loading happens on first use, one load at a time; :meth:`ExpertSetStore.stats` never waits for one.
"""

import collections
import threading
import time
from typing import Callable, Dict, List

from taskmoe_fairseq.errors import usage_error


class ExpertSet:
    """One loaded sub-network: ``model``, the extraction ``rows`` and the translators by pair."""

    def __init__(self, key, model, rows, load_seconds: float):
        self.key, self.model, self.rows, self.load_seconds = key, model, rows, load_seconds
        self.translators: Dict[str, object] = {}
        self.pairs: List[str] = []


class ExpertSetStore:
    """LRU cache ``key -> ExpertSet``.

    Args:
        build: ``build(pair) -> (model, rows)`` (reads the pair's experts from the checkpoint).
        make_translator: ``make_translator(pair, model) -> translator`` (cheap: no weights).
        key_of: ``key_of(pair) -> ExpertSetKey``.
        max_sets: how many expert sets stay loaded (at least 1).
    """

    def __init__(self, build: Callable, make_translator: Callable, key_of: Callable, max_sets: int):
        if max_sets < 1:
            raise usage_error(f"--max-expert-sets must be at least 1 (got {max_sets})")
        self.build, self.make_translator, self.key_of, self.max_sets = build, make_translator, key_of, max_sets
        self._sets: "collections.OrderedDict" = collections.OrderedDict()
        self._lock = threading.Lock()  # the index (``_sets``, counters)
        self._load_lock = threading.Lock()  # loading
        self.loads = 0
        self.evictions = 0

    def translator(self, pair: str):
        """The translator of ``pair``, loading its expert set (and evicting the least recently used) if needed."""
        key = self.key_of(pair)
        with self._load_lock:  # one load at a time; the index lock is only held for a moment (``stats`` never waits for a load)
            with self._lock:
                entry = self._sets.get(key)
                if entry is not None:
                    self._sets.move_to_end(key)
            if entry is None:
                start = time.perf_counter()
                model, rows = self.build(pair)
                entry = ExpertSet(key, model, rows, time.perf_counter() - start)
                with self._lock:
                    self._sets[key] = entry
                    self.loads += 1
                    while len(self._sets) > self.max_sets:
                        self._sets.popitem(last=False)
                        self.evictions += 1
            if pair not in entry.translators:
                entry.translators[pair] = self.make_translator(pair, entry.model)
                with self._lock:
                    entry.pairs.append(pair)
            return entry.translators[pair]

    def stats(self) -> dict:
        """What ``GET /health`` reports: loaded sets (least recent first), limits and counters."""
        with self._lock:
            loaded = [
                {"pairs": list(entry.pairs), "experts": {row["layer"]: row["experts"] for row in entry.rows},
                 "load_seconds": round(entry.load_seconds, 3)}
                for entry in self._sets.values()
            ]
        return {"loaded": loaded, "max": self.max_sets, "loads": self.loads, "evictions": self.evictions}
