"""The MoE feed-forward sublayer: E experts, one gate, and the dispatch.

Dispatch costs grow with tokens x k, not tokens x E x capacity: token routing
sorts the kept (token, expert) assignments by expert and runs each expert on
one contiguous slice; sentence, task and static routing group the sentences
that share an expert set and run only those k experts on them. fairscale's
``MOELayer`` is not used: it needs a process group and an all-to-all even on
one device, dispatches with dense ``[tokens, E, capacity]`` one-hot einsums,
and its gates only see the token tensor, never the task.
"""

from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.expert_feed_forward import ExpertFeedForward
from taskmoe_fairseq.modules.routing_decision import RoutingDecision, RoutingInputs
from taskmoe_fairseq.modules.sentence_gate import SentenceTopKGate
from taskmoe_fairseq.modules.static_gate import StaticTaskGate
from taskmoe_fairseq.modules.task_gate import TaskGate
from taskmoe_fairseq.modules.token_gate import TokenTopKGate


def masked_mean(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """Mean over time of ``x`` ``[T, B, C]`` ignoring pads (``padding_mask`` ``[B, T]``, True = pad)."""
    if padding_mask is None:
        return x.mean(dim=0)
    keep = (~padding_mask).t().unsqueeze(-1).type_as(x)
    return (x * keep).sum(dim=0) / keep.sum(dim=0).clamp_min(1.0)


def combine_experts(x: Tensor, experts: List[nn.Module], weights: Tensor) -> Tensor:
    """``sum_k weights[..., k] * experts[k](x)`` in k order (the order extraction keeps).

    ``x``: ``[T, B, C]``; ``weights``: ``[B, K]`` per sentence or ``[K]`` for all.
    """
    out = None
    for k, expert in enumerate(experts):
        weight = weights[..., k].to(x.dtype)
        y = expert(x) * (weight if weight.dim() == 0 else weight[None, :, None])
        out = y if out is None else out + y
    return out


class MoeFeedForward(nn.Module):
    """Replaces a Transformer FFN with ``num_experts`` experts and a gate.

    ``routing`` is one of :data:`routing_kinds.ROUTING_CHOICES`. Input and
    output ``[T, B, C]``; after each forward, ``last_decision`` holds the
    gate's :class:`RoutingDecision` (gate loss and expert load) for the
    criterion, as fairscale's ``MOELayer.l_aux`` does.
    """

    def __init__(
        self,
        routing: str,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int,
        num_langs: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 0.0,
        second_expert_policy: str = "all",
    ):
        super().__init__()
        self.routing = routing
        self.task_key = routing_kinds.task_key(routing)
        self.num_langs = num_langs
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts = nn.ModuleList(
            ExpertFeedForward(embed_dim, ffn_dim, activation_fn, activation_dropout) for _ in range(num_experts)
        )
        if routing == routing_kinds.TOKEN:
            self.gate = TokenTopKGate(
                embed_dim, num_experts, top_k, capacity_factor, eval_capacity_factor, second_expert_policy
            )
        elif routing == routing_kinds.SENTENCE:
            self.gate = SentenceTopKGate(embed_dim, num_experts, top_k)
        elif routing_kinds.is_static(routing):
            self.gate = StaticTaskGate(num_experts, top_k)
        else:
            self.gate = TaskGate(routing_kinds.num_tasks(self.task_key, num_langs), num_experts, top_k)
        self.last_decision: Optional[RoutingDecision] = None

    def forward(self, x: Tensor, padding_mask: Optional[Tensor], inputs: RoutingInputs) -> Tensor:
        """``x``: ``[T, B, C]``; ``padding_mask``: ``[B, T]`` (True = pad) or None."""
        if self.gate.per_sentence:
            decision = self._route_sentences(x, padding_mask, inputs)
            out = self._dispatch_sentences(x, decision)
        else:
            decision, out = self._route_and_dispatch_tokens(x, padding_mask)
        self.last_decision = decision
        return out

    def _route_sentences(self, x, padding_mask, inputs: RoutingInputs) -> RoutingDecision:
        if padding_mask is None:
            sentence_tokens = x.new_full((x.size(1),), float(x.size(0)), dtype=torch.float32)
        else:
            sentence_tokens = (~padding_mask).sum(dim=1).float()
        if self.task_key is None:
            summary = inputs.sentence_summary if inputs.sentence_summary is not None else masked_mean(x, padding_mask)
            return self.gate(summary, sentence_tokens)
        if inputs.src_lang_id is None or inputs.tgt_lang_id is None:
            raise usage_error(
                f"'{self.routing}' routing needs each sentence's languages, but the batch has none: "
                "run with --task multilingual_translation_taskmoe"
            )
        tasks = routing_kinds.task_ids(self.task_key, inputs.src_lang_id, inputs.tgt_lang_id, self.num_langs)
        return self.gate(tasks, sentence_tokens)

    def _dispatch_sentences(self, x: Tensor, decision: RoutingDecision) -> Tensor:
        """Run each group of sentences that shares an expert set through those k experts."""
        index = decision.expert_index
        if bool((index == index[:1]).all()):  # the usual case in generation: one language pair per batch
            return combine_experts(x, [self.experts[e] for e in index[0].tolist()], decision.expert_weight)
        groups, sentence_group = torch.unique(index, dim=0, return_inverse=True)
        expert_sets = groups.tolist()
        out = torch.empty_like(x)
        for group, expert_set in enumerate(expert_sets):
            sentences = (sentence_group == group).nonzero().squeeze(1)
            routed = combine_experts(
                x.index_select(1, sentences),
                [self.experts[e] for e in expert_set],
                decision.expert_weight.index_select(0, sentences),
            )
            out.index_copy_(1, sentences, routed)
        return out

    def _route_and_dispatch_tokens(self, x: Tensor, padding_mask: Optional[Tensor]):
        """Token routing over the non-pad tokens of ``x``, in time-major order."""
        channels = x.size(-1)
        flat = x.reshape(-1, channels)
        if padding_mask is not None:
            real = (~padding_mask).t().reshape(-1).nonzero().squeeze(1)
            tokens = flat.index_select(0, real)
        else:
            real, tokens = None, flat
        decision = self.gate(tokens)
        routed = self._dispatch_tokens(tokens, decision)
        if real is None:
            return decision, routed.view_as(x)
        out = flat.new_zeros(flat.shape).index_copy_(0, real, routed)
        return decision, out.view_as(x)

    def _dispatch_tokens(self, tokens: Tensor, decision: RoutingDecision) -> Tensor:
        """Sort kept assignments by expert, run each expert once on its slice, scatter back."""
        num_tokens, top_k = decision.expert_index.shape
        expert = decision.expert_index.reshape(-1)
        weight = decision.expert_weight.reshape(-1)
        token = torch.arange(num_tokens, device=tokens.device).repeat_interleave(top_k)
        kept = weight > 0
        expert, weight, token = expert[kept], weight[kept], token[kept]
        order = torch.argsort(expert, stable=True)
        expert, weight, token = expert[order], weight[order], token[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        routed = tokens.index_select(0, token).split(counts)
        outputs = [self.experts[e](chunk) for e, chunk in enumerate(routed) if counts[e] > 0]
        out = tokens.new_zeros(tokens.shape)
        if outputs:
            out.index_add_(0, token, torch.cat(outputs) * weight.to(tokens.dtype)[:, None])
        return out
