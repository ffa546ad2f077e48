"""The MoE feed-forward sublayer: E experts and the dispatch.

Token routing decides inside the layer: its GShard gate (``gate``) sees each
token. Sentence, task and static routing are decided once per forward, before
the first layer, by the model's router
(:class:`~taskmoe_fairseq.models.router.MoeRouter`); the layer receives that
decision as data (``expert_index`` / ``expert_weight``, ``[B, K]``).

The experts are stacked (:class:`StackedExperts`: ``experts.fc1_weight [E, F, C]``
...). Dispatch costs grow with tokens x k, not tokens x E x capacity: token
routing sorts the kept (token, expert) assignments by expert and computes them
together (one capacity-padded ``baddbmm`` per FFN layer, or a loop over the used
experts' slices where padding would cost more: :meth:`StackedExperts.forward`);
per-sentence routing groups the sentences that share an expert set and runs only
those k experts on them. fairscale's ``MOELayer`` is
not used: it needs a process group and an all-to-all even on one device,
dispatches with dense ``[tokens, E, capacity]`` one-hot einsums, and its gates
only see the token tensor, never the task.

With expert parallelism (``expert_parallel``, see
:mod:`taskmoe_fairseq.expert_parallel.dispatch`) the layer holds only this
rank's E / P experts (local expert ``j`` is global expert ``expert_offset + j``).
Both routings then dispatch the same way: the kept (token, expert) assignments
of the non-pad tokens, sorted by expert, go to the rank holding their expert by
all-to-all and come back; a per-sentence decision is applied to each of the
sentence's tokens (pad positions get a zero FFN output, which nothing reads:
attention masks pad keys and the loss ignores pad targets).
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.expert_parallel import dispatch as ep_dispatch
from taskmoe_fairseq.modules.expert_feed_forward import StackedExperts, combine_experts
from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.routing_decision import ExpertSets, RoutingDecision
from taskmoe_fairseq.modules.token_gate import TokenTopKGate


class MoeFeedForward(nn.Module):
    """Replaces a Transformer FFN with ``num_experts`` experts.

    ``token_gate``: a :class:`TokenTopKGate` for token routing, ``None`` for a
    layer routed per sentence (task, static, sentence); ``expert_parallel``:
    this rank's :class:`~taskmoe_fairseq.expert_parallel.dispatch.ExpertParallel`
    (None: every expert here). Input and output ``[T, B, C]``.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        token_gate: Optional[TokenTopKGate] = None,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        expert_parallel: Optional[ep_dispatch.ExpertParallel] = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.activation_fn, self.activation_dropout = activation_fn, activation_dropout
        self.expert_parallel = expert_parallel
        local = expert_parallel.local_range(num_experts) if expert_parallel is not None else range(num_experts)
        self.expert_offset = local.start
        # every expert is initialised in order (the random stream of one process holding all E),
        # then only this rank's are kept: expert e starts equal whatever P is
        self.experts = StackedExperts.initialised(embed_dim, ffn_dim, num_experts, local, activation_fn, activation_dropout)
        if expert_parallel is not None:
            ep_dispatch.mark_expert_parameters(self.experts)
        if token_gate is not None:
            self.gate = token_gate

    @property
    def routes_tokens(self) -> bool:
        """Token routing: the layer decides itself and reports its own :class:`MoeAux`."""
        return hasattr(self, "gate")

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        expert_index: Optional[Tensor] = None,
        expert_weight: Optional[Tensor] = None,
        expert_sets: Optional[ExpertSets] = None,
    ) -> Tuple[Tensor, Optional[RoutingDecision]]:
        """``x``: ``[T, B, C]``; ``padding_mask``: ``[B, T]`` (True = pad) or None;
        ``expert_index`` (LongTensor) / ``expert_weight`` (float32): ``[B, K]``, the
        router's per-sentence decision (required unless token-routed); ``expert_sets``: its
        distinct expert sets, found once per batch by the router (None: found here).

        Returns ``[T, B, C]`` and, for token routing, the gate's decision (else None).

        Raises:
            ValueError: a per-sentence layer called without a decision.
        """
        if self.routes_tokens:
            return self._route_and_dispatch_tokens(x, padding_mask)
        if expert_index is None or expert_weight is None:
            raise ValueError(
                "this MoE layer is routed per sentence and needs the router's expert_index/expert_weight "
                "(the model's encoder computes them; call the model, not the layer)"
            )
        if self.expert_parallel is not None:
            return self._dispatch_sentences_parallel(x, padding_mask, expert_index, expert_weight), None
        return self._dispatch_sentences(x, expert_index, expert_weight, expert_sets), None

    def extract(self, experts: Tensor, weights: Tensor, merge: bool = False) -> ExtractedFeedForward:
        """The serving form for one task: experts ``[K]`` (ids) with frozen weights ``[K]``
        (Kudugunta et al., 2021, section 4: extract the sub-network for a task)."""
        if self.expert_parallel is not None:
            raise usage_error(
                "this layer holds only its rank's experts (expert parallelism): extract from the consolidated "
                "checkpoint or the sharded one (python -m taskmoe_fairseq.extract)"
            )
        return ExtractedFeedForward.from_experts([self.experts.expert_module(int(e)) for e in experts], weights, merge)

    def _dispatch_sentences(self, x: Tensor, index: Tensor, weight: Tensor, sets: Optional[ExpertSets]) -> Tensor:
        """Run each group of sentences that shares an expert set through those k experts.

        With one set (a batch of one language pair: fairseq-generate, translate, the server) every
        sentence goes through its k experts at once. With several, a full sequence (training,
        validation) takes each group's sentences by index, while a decoding step (``T == 1``, where
        a step's latency, not its arithmetic, counts) runs every set on every sentence and keeps
        each sentence's own result: no host synchronisation at any step.
        """
        sets = sets if sets is not None else ExpertSets.of(index)
        expert_fns = self.experts.expert_fns()
        if len(sets.sets) == 1:
            return combine_experts(x, [expert_fns[e] for e in sets.sets[0]], weight)
        out = torch.zeros_like(x)
        for group, expert_set in enumerate(sets.sets):
            experts = [expert_fns[e] for e in expert_set]
            in_group = sets.sentence_set == group
            if x.size(0) == 1:  # a decoding step: [1, B, C]
                out = torch.where(in_group[None, :, None], combine_experts(x, experts, weight), out)
                continue
            sentences = in_group.nonzero().squeeze(1)
            routed = combine_experts(x.index_select(1, sentences), experts, weight.index_select(0, sentences))
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
            return routed.view_as(x), decision
        out = flat.new_zeros(flat.shape).index_copy_(0, real, routed)
        return out.view_as(x), decision

    def _dispatch_tokens(self, tokens: Tensor, decision: RoutingDecision) -> Tensor:
        """Sort kept assignments by expert, compute them together (:meth:`StackedExperts.forward`), scatter back."""
        num_tokens, top_k = decision.expert_index.shape
        expert = decision.expert_index.reshape(-1)
        weight = decision.expert_weight.reshape(-1)
        token = torch.arange(num_tokens, device=tokens.device).repeat_interleave(top_k)
        kept = weight > 0
        expert, weight, token = expert[kept], weight[kept], token[kept]
        order = torch.argsort(expert, stable=True)
        expert, weight, token = expert[order], weight[order], token[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        if self.expert_parallel is not None:
            outputs = ep_dispatch.run_experts(tokens.index_select(0, token), counts, self.experts, self.expert_parallel)
            out = tokens.new_zeros(tokens.shape)
            return out.index_add_(0, token, outputs.to(tokens.dtype) * weight.to(tokens.dtype)[:, None])
        out = tokens.new_zeros(tokens.shape)
        if token.numel():
            outputs = self.experts(tokens.index_select(0, token), counts)
            # in the tokens' dtype, as combine_experts (under autocast the experts return float16/bfloat16)
            out.index_add_(0, token, outputs.to(tokens.dtype) * weight.to(tokens.dtype)[:, None])
        return out

    def _dispatch_sentences_parallel(self, x: Tensor, padding_mask: Optional[Tensor], index: Tensor, weight: Tensor):
        """Expert parallelism for a per-sentence decision (``[B, K]``): every non-pad token
        takes its sentence's experts and weights, then goes the token path's way."""
        channels, batch = x.size(-1), x.size(1)
        flat = x.reshape(-1, channels)
        sentence = torch.arange(flat.size(0), device=x.device) % batch  # time-major: position t * B + b
        if padding_mask is not None:
            real = (~padding_mask).t().reshape(-1).nonzero().squeeze(1)
        else:
            real = torch.arange(flat.size(0), device=x.device)
        sentence = sentence.index_select(0, real)
        decision = RoutingDecision(
            expert_index=index.index_select(0, sentence),
            expert_weight=weight.index_select(0, sentence),
            per_sentence=False,
            gate_loss=x.new_zeros(()),
            expert_load=x.new_zeros(self.num_experts),
            dropped_share=x.new_zeros(()),
        )
        routed = self._dispatch_tokens(flat.index_select(0, real), decision)
        return flat.new_zeros(flat.shape).index_copy_(0, real, routed).view_as(x)
