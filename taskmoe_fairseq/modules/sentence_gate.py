"""The paper's ``sentence`` routing: one top-k decision per sentence."""

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from taskmoe_fairseq.modules.float32_params import Float32Params, autocast_off
from taskmoe_fairseq.modules.routing_decision import (
    RoutingDecision,
    expert_load,
    load_balancing_loss,
    top_k_weights,
)


class SentenceTopKGate(Float32Params, nn.Module):
    """Gates on a sentence summary (:class:`~taskmoe_fairseq.models.router.MoeRouter`
    passes the mean of the sentence's non-pad token embeddings in the encoder, of
    the encoder output in the decoder), so all tokens of a sentence share k
    experts and weights; nothing is dropped. ``wg`` stays float32 and the gate computes
    in float32, under autocast (``--amp``) too."""

    per_sentence = True

    def __init__(self, model_dim: int, num_experts: int, top_k: int = 2):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, summary: Tensor, sentence_tokens: Tensor) -> RoutingDecision:
        """``summary``: ``[B, C]``; ``sentence_tokens``: float ``[B]`` non-pad tokens per sentence.
        Returns ``[B, K]`` rows (float32 weights), with autocast off (:func:`autocast_off`)."""
        with autocast_off(summary.device):
            probs = F.linear(summary.float(), self.wg.weight.float()).softmax(dim=-1)
            weights, index = top_k_weights(probs, self.top_k)
            return RoutingDecision(
                expert_index=index,
                expert_weight=weights,
                per_sentence=True,
                gate_loss=load_balancing_loss(probs, index[:, 0], sentence_tokens),
                expert_load=expert_load(index, weights, self.num_experts, sentence_tokens),
                dropped_share=probs.new_zeros(()),
            )
