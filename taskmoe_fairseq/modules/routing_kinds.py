"""The routing granularities of Kudugunta et al. (2021), "Beyond Distillation:
Task-level Mixture-of-Experts for Efficient Inference", section 2, and how a
task routing turns a sentence's languages into a task id.

======================  ===================================================
``token``               GShard top-k gate on each token's representation
``sentence``            gate on the mean of the sentence's token states
``source``              learned gate on the source language (a task)
``target``              learned gate on the target language (the paper's best
                        decoder routing: fr->en and de->en are one task)
``pair``                learned gate on the language pair
``static-source`` etc.  fixed, unlearned assignment of k experts per task
======================  ===================================================

Language ids are 0-based indices into the model's language list (``--langs``
order), so a task id is ``src`` or ``tgt`` (``L`` tasks) or ``src * L + tgt``
(``L * L`` tasks) for pair routing.
"""

from typing import List, Optional, Sequence

import torch

from taskmoe_fairseq.errors import usage_error

TOKEN = "token"
SENTENCE = "sentence"
TASK_KEYS = ("source", "target", "pair")
STATIC_PREFIX = "static-"
ROUTING_CHOICES = (TOKEN, SENTENCE) + TASK_KEYS + tuple(STATIC_PREFIX + key for key in TASK_KEYS)


def task_key(routing: str) -> Optional[str]:
    """``source``/``target``/``pair`` for task and static routings, ``None`` otherwise."""
    key = routing[len(STATIC_PREFIX):] if routing.startswith(STATIC_PREFIX) else routing
    return key if key in TASK_KEYS else None


def is_static(routing: str) -> bool:
    return routing.startswith(STATIC_PREFIX)


def is_extractable(routing: str) -> bool:
    """Whether every token of one language pair uses the same experts."""
    return task_key(routing) is not None


def is_per_sentence(routing: str) -> bool:
    """Whether the routing makes one decision per sentence (all but ``token``),
    taken once per forward by the model's router rather than inside the layer."""
    return routing != TOKEN


def layer_name(side: str, index: int) -> str:
    """The one name of an MoE layer everywhere (reports, logged metrics): ``"decoder.3"``."""
    return f"{side}.{index}"


def language_index(langs: Sequence[str], lang: str) -> int:
    """0-based id of ``lang`` in the model's language list (``--langs`` order)."""
    try:
        return list(langs).index(lang)
    except ValueError:
        raise usage_error(f"unknown language '{lang}': the model knows {','.join(langs)}") from None


def pair_task_ids(key: str, pair: str, langs: List[str]) -> int:
    """The task id of a ``src-tgt`` pair under task key ``key`` (an int)."""
    src, tgt = pair.split("-")
    # plain ints: no tensor (also right inside a ``torch.device("meta")`` context, and nothing to read back)
    return task_ids(key, language_index(langs, src), language_index(langs, tgt), len(langs))


def num_tasks(key: str, num_langs: int) -> int:
    return num_langs * num_langs if key == "pair" else num_langs


def task_ids(key: str, src_lang_id: torch.Tensor, tgt_lang_id: torch.Tensor, num_langs: int) -> torch.Tensor:
    """Task id per sentence.

    Args:
        src_lang_id, tgt_lang_id: LongTensor ``[batch]`` of language ids (or two ints).
    Returns:
        LongTensor ``[batch]`` (an int) in ``[0, num_tasks(key, num_langs))``.
    """
    if key == "source":
        return src_lang_id
    if key == "target":
        return tgt_lang_id
    return src_lang_id * num_langs + tgt_lang_id
