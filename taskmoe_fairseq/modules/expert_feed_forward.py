"""One expert: the Transformer's ReLU feed-forward block (GShard experts are plain FFNs),
and the weighted sum of k experts that MoE and extracted layers share."""

from typing import List

import torch.nn as nn
from fairseq import utils
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor


class ExpertFeedForward(nn.Module):
    """``fc2(dropout(act(fc1(x))))``: ``[..., C] -> [..., C]`` through width ``ffn_dim``.

    Parameter names match fairseq's ``TransformerEncoderLayer`` (``fc1``, ``fc2``)
    so a dense FFN and an expert read alike in a state dict.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str = "relu", activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation_fn = utils.get_activation_fn(activation=activation_fn)
        self.activation_dropout_module = FairseqDropout(activation_dropout, module_name=self.__class__.__name__)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(x))))


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
