"""What a gate decides for one MoE layer, what the layer reports, and the GShard
arithmetic both use (top-k weights, load-balancing loss, expert load)."""

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class RoutingDecision:
    """Top-k routing of ``R`` rows (tokens, or sentences when ``per_sentence``).

    ``expert_index``: LongTensor ``[R, K]``; ``expert_weight``: float32 ``[R, K]``,
    zero for an assignment dropped by capacity; ``gate_loss``: scalar
    load-balancing loss (1.0 when balanced); ``expert_load``: float32 ``[E]``,
    share of token-assignments per expert; ``dropped_share``: share of
    token-assignments dropped by capacity.
    """

    expert_index: Tensor
    expert_weight: Tensor
    per_sentence: bool
    gate_loss: Tensor
    expert_load: Tensor
    dropped_share: Tensor

    def aux(self, layer: str) -> "MoeAux":
        return MoeAux(layer, self.gate_loss, self.expert_load, self.dropped_share)


class ExpertSets(NamedTuple):
    """The distinct expert sets of a per-sentence decision, found once per batch.

    A task- or static-routed layer's decision is fixed for a sentence, so the router finds its
    distinct rows once (one host synchronisation per layer and batch, in the encoder's forward)
    and every later forward of the batch (each beam-search step) dispatches without asking the
    device again. ``sets``: the ``G`` distinct rows of ``expert_index`` ``[B, K]`` as Python ints
    (host side); ``sentence_set``: LongTensor ``[B]``, the set each sentence uses, reordered with
    the beams (:meth:`index_select`), so the sets stay valid as beam search reorders and shrinks
    the batch.
    """

    sets: Tuple[Tuple[int, ...], ...]
    sentence_set: Tensor

    @classmethod
    def of(cls, expert_index: Tensor) -> "ExpertSets":
        """From a decision's ``expert_index`` ``[B, K]`` (synchronises once: ``torch.unique``)."""
        sets, sentence_set = torch.unique(expert_index, dim=0, return_inverse=True)
        return cls(tuple(tuple(row) for row in sets.tolist()), sentence_set)

    def index_select(self, order: Tensor) -> "ExpertSets":
        """The same sets for the sentences ``order`` (beam search's ``new_order``)."""
        return ExpertSets(self.sets, self.sentence_set.index_select(0, order))


@dataclass
class MoeAux:
    """One MoE layer's auxiliary outputs of one forward, returned through the model's
    output (``net_output[1]["moe_aux"]``, a list, as fairseq's MoE branch returns
    ``l_aux`` with the decoder's extra) and read by the criterion.

    ``layer``: ``"encoder.1"``-style name (:func:`routing_kinds.layer_name`);
    ``gate_loss``: scalar with gradient; ``expert_load``: float32 ``[E]``;
    ``dropped_share``: scalar, share of token-assignments dropped by capacity.
    """

    layer: str
    gate_loss: Tensor
    expert_load: Tensor
    dropped_share: Tensor


def top_k_weights(probs: Tensor, top_k: int):
    """Top-k experts of gate probabilities ``[R, E]`` and their weights ``[R, K]``.

    As in GShard, the k weights are renormalised to sum to 1; with k = 1 the raw
    probability is kept (Switch Transformer), so the gate still gets a gradient.
    """
    weights, index = probs.topk(top_k, dim=-1)
    return renormalise(weights), index


def renormalise(weights: Tensor) -> Tensor:
    """``[R, K]`` weights scaled to sum to 1 per row, in their given order (k = 1: unchanged)."""
    if weights.size(-1) == 1:
        return weights
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)


def load_balancing_loss(probs: Tensor, top1: Tensor, row_tokens: Optional[Tensor] = None) -> Tensor:
    """GShard's auxiliary loss ``E * sum_e mean_prob_e * top1_share_e``.

    Args:
        probs: float32 ``[R, E]`` gate probabilities.
        top1: LongTensor ``[R]``, each row's first expert.
        row_tokens: float ``[R]`` tokens each row stands for (sentence and task
            gates route a whole sentence with one row); ``None`` means 1 each.
    Returns:
        scalar; exactly 1.0 for perfectly balanced routing, up to E when all
        tokens go to one expert.
    """
    num_experts = probs.size(-1)
    if row_tokens is None:
        row_tokens = probs.new_ones(probs.size(0))
    total = row_tokens.sum().clamp_min(1.0)
    mean_prob = (probs * row_tokens[:, None]).sum(0) / total
    top1_share = probs.new_zeros(num_experts).index_add_(0, top1, row_tokens) / total
    return num_experts * (mean_prob * top1_share).sum()


def expert_load(index: Tensor, weight: Tensor, num_experts: int, row_tokens: Optional[Tensor] = None) -> Tensor:
    """Share of kept token-assignments per expert, float32 ``[E]`` (no gradient)."""
    with torch.no_grad():
        kept = (weight > 0).float()
        if row_tokens is not None:
            kept = kept * row_tokens[:, None]
        load = kept.new_zeros(num_experts).index_add_(0, index.reshape(-1), kept.reshape(-1))
        return load / load.sum().clamp_min(1.0)
