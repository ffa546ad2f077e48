"""The serving form of a task-routed MoE layer for one language pair.

:meth:`MoeFeedForward.extract` keeps the k experts the router selects for the
pair, in the gate's order, with their weights frozen into a float32 buffer:
``y = sum_k w_k * expert_k(x)``, the same arithmetic as the full layer. With
``merge`` the k experts are folded into one expert of width ``k * ffn_dim``
and weight 1 (first layers stacked, second layers scaled by the weights).
"""

import copy
from typing import List

import torch
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.modules.expert_feed_forward import ExpertFeedForward, combine_experts, ffn_tensors, merge_experts
from taskmoe_fairseq.modules.float32_params import Float32Params


class ExtractedFeedForward(Float32Params, nn.Module):
    """``kept_experts`` experts of width ``ffn_dim`` and frozen weights float32 ``[kept_experts]``."""

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

    routes_tokens = False
    float32_submodules = False  # the experts follow the model's dtype; only the weights stay float32

    @classmethod
    def from_experts(cls, experts: List[ExpertFeedForward], weights: Tensor, merge: bool = False):
        """Copies of ``experts`` with ``weights`` ``[K]`` frozen in, or (``merge``) one merged expert."""
        weights = weights.detach().float().cpu()
        first = experts[0]
        embed_dim, ffn_dim = first.fc1.in_features, first.fc1.out_features
        dtype = first.fc1.weight.dtype
        if not merge:
            out = cls(embed_dim, ffn_dim, len(experts), activation_dropout=first.activation_dropout_module.p)
            out.experts = nn.ModuleList(copy.deepcopy(expert) for expert in experts)
            out.expert_weights.copy_(weights)
            return out
        out = cls(embed_dim, ffn_dim * len(experts), 1, activation_dropout=first.activation_dropout_module.p)
        merged = out.experts[0]
        merged.activation_fn = first.activation_fn
        with torch.no_grad():
            for parameter, value in zip(ffn_tensors(merged), merge_experts([ffn_tensors(e) for e in experts], weights)):
                parameter.copy_(value)
        out.expert_weights.fill_(1.0)
        return out.to(dtype)

    def forward(self, x: Tensor, padding_mask=None, expert_index=None, expert_weight=None, expert_sets=None):
        """``x``: ``[T, B, C]`` -> (``[T, B, C]``, None); the routing was fixed at extraction."""
        return combine_experts(x, list(self.experts), self.expert_weights), None
