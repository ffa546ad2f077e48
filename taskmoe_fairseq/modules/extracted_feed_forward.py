"""The serving form of a task-routed MoE layer for one language pair.

:mod:`taskmoe_fairseq.extract` evaluates the task gate once for the pair and
keeps the k experts it selects, in the gate's order, with their weights frozen
into a buffer: ``y = sum_k w_k * expert_k(x)``, the same arithmetic as the full
layer. With ``--merge-experts`` the k experts are folded into one expert of
width ``k * ffn_dim`` and weight 1.
"""

import torch
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.modules.expert_feed_forward import ExpertFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import combine_experts
from taskmoe_fairseq.modules.routing_decision import RoutingInputs


class ExtractedFeedForward(nn.Module):
    """``kept_experts`` experts of width ``ffn_dim`` and frozen weights ``[kept_experts]``."""

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        kept_experts: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
    ):
        super().__init__()
        self.experts = nn.ModuleList(
            ExpertFeedForward(embed_dim, ffn_dim, activation_fn, activation_dropout) for _ in range(kept_experts)
        )
        self.register_buffer("expert_weights", torch.full((kept_experts,), 1.0 / kept_experts))
        self.last_decision = None  # no gate: nothing for the criterion to log

    def forward(self, x: Tensor, padding_mask=None, inputs: RoutingInputs = None) -> Tensor:
        """``x``: ``[T, B, C]`` -> ``[T, B, C]``; routing inputs are not needed any more."""
        return combine_experts(x, list(self.experts), self.expert_weights)
