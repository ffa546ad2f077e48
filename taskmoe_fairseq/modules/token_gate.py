"""GShard top-k token gate (Lepikhin et al., 2021), the paper's ``token`` routing."""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from taskmoe_fairseq.modules.float32_params import Float32Params, autocast_off
from taskmoe_fairseq.modules.routing_decision import (
    RoutingDecision,
    expert_load,
    load_balancing_loss,
    renormalise,
    top_k_weights,
)

SECOND_EXPERT_POLICIES = ("all", "sampling", "random")


class TokenTopKGate(Float32Params, nn.Module):
    """Routes each token to its top-k experts under an expert capacity.

    Capacity per expert is ``ceil(capacity_factor * k * N / E)`` for ``N``
    tokens; assignments over capacity are dropped in token order, first choices
    before second choices (GShard Algorithm 1), and the token keeps only its
    residual path for them. ``eval_capacity_factor <= 0`` drops nothing at
    evaluation. The second-expert policy applies in training only: ``all``
    keeps the second choice, ``sampling`` picks it from gumbel-noised logits
    (fairscale's Top2Gate), ``random`` keeps it with probability ``2 * w2``
    (GShard's random routing).

    Unlike fairscale's ``Top2Gate`` this gate does not build dense one-hot
    ``[N, E, capacity]`` dispatch tensors and does not need ``N % E == 0``; the
    layer dispatches by sorting assignments (cost ``N * k``). ``wg`` stays
    float32 in fp16/bf16 models and the gate computes in float32, under autocast
    (``--amp``) too.
    """

    per_sentence = False

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 0.0,
        second_expert_policy: str = "all",
    ):
        super().__init__()
        assert second_expert_policy in SECOND_EXPERT_POLICIES, second_expert_policy
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.second_expert_policy = second_expert_policy

    def capacity(self, num_tokens: int) -> Optional[int]:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor <= 0:
            return None
        return max(1, math.ceil(factor * self.top_k * num_tokens / self.num_experts))

    def forward(self, tokens: Tensor) -> RoutingDecision:
        """``tokens``: ``[N, C]`` non-pad token states (any float dtype); returns a per-token
        decision (float32 weights and losses), with autocast off (:func:`autocast_off`)."""
        with autocast_off(tokens.device):
            return self._route(tokens)

    def _route(self, tokens: Tensor) -> RoutingDecision:
        # Gate math in fp32 (as fairseq's MoE and fairscale do) so fp16/bf16 runs route stably.
        logits = F.linear(tokens.float(), self.wg.weight.float())
        probs = logits.softmax(dim=-1)
        weights, index = top_k_weights(probs, self.top_k)
        if self.training and self.top_k > 1 and self.second_expert_policy == "sampling":
            noisy = logits - torch.empty_like(logits).exponential_().log()  # + gumbel noise
            noisy = noisy.scatter(1, index[:, :1], float("-inf"))
            rest = noisy.topk(self.top_k - 1, dim=-1).indices
            index = torch.cat([index[:, :1], rest], dim=1)
            # the weights of the chosen experts, in the order of ``index`` (not re-sorted)
            weights = renormalise(probs.gather(1, index))
        elif self.training and self.top_k > 1 and self.second_expert_policy == "random":
            keep = torch.rand_like(weights[:, 1:]) < 2 * weights[:, 1:]
            weights = torch.cat([weights[:, :1], weights[:, 1:] * keep], dim=1)

        gate_loss = load_balancing_loss(probs, index[:, 0])
        assigned = weights > 0
        capacity = self.capacity(tokens.size(0))
        if capacity is not None:
            weights = weights * self._within_capacity(index, assigned, capacity)
        num_assigned = assigned.sum().clamp_min(1)
        dropped = (assigned & (weights == 0)).sum() / num_assigned
        return RoutingDecision(
            expert_index=index,
            expert_weight=weights,
            per_sentence=False,
            gate_loss=gate_loss,
            expert_load=expert_load(index, weights, self.num_experts),
            dropped_share=dropped.float().detach(),
        )

    def _within_capacity(self, index: Tensor, assigned: Tensor, capacity: int) -> Tensor:
        """Bool ``[N, K]``: the assignment's slot in its expert is below capacity.

        Slots are handed out in token order, choice by choice: O(N * E) memory,
        never ``[N, E, capacity]``.
        """
        filled = index.new_zeros(self.num_experts)
        within = torch.zeros_like(assigned)
        for choice in range(index.size(1)):
            one_hot = F.one_hot(index[:, choice], self.num_experts) * assigned[:, choice, None]
            slot = (one_hot.cumsum(0) - 1 + filled).gather(1, index[:, choice, None]).squeeze(1)
            within[:, choice] = assigned[:, choice] & (slot < capacity)
            filled += (one_hot * within[:, choice, None]).sum(0)
        return within
