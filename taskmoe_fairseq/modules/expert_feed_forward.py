"""One expert: the Transformer's ReLU feed-forward block (GShard experts are plain FFNs),
and the weighted sum of k experts that MoE and extracted layers share."""

from typing import List, Sequence, Tuple

import torch
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

    ``x``: ``[T, B, C]``; ``weights``: ``[B, K]`` per sentence or ``[K]`` for all. The sum is
    taken in ``x``'s dtype: under autocast (``--amp``) an expert returns float16/bfloat16 for a
    float32 ``x``, and a 0-dim weight (``[K]``) would not promote the product to float32 as a
    ``[B, K]`` one does, so the output is cast to ``x.dtype`` first (the full and the
    extracted layer then agree; fairseq's dense FFN likewise adds its output to the float32
    residual).
    """
    out = None
    for k, expert in enumerate(experts):
        weight = weights[..., k].to(x.dtype)
        y = expert(x).to(x.dtype) * (weight if weight.dim() == 0 else weight[None, :, None])
        out = y if out is None else out + y
    return out


#: one FFN's tensors in fairseq's order: ``(fc1.weight [F, C], fc1.bias [F], fc2.weight [C, F], fc2.bias [C])``
FfnTensors = Tuple[Tensor, Tensor, Tensor, Tensor]


def merge_experts(experts: Sequence[FfnTensors], weights: Tensor) -> FfnTensors:
    """The one FFN of width ``k * F`` equal to ``sum_j weights[j] * expert_j(x)`` for ReLU-like
    experts: ``fc1`` rows stacked, ``fc2`` columns scaled by ``weights[j]`` and stacked, ``fc2``
    biases summed with the weights (exact in real arithmetic; float rounding differs from the
    experts' weighted sum). ``weights``: float ``[k]``, cast to the experts' dtype. The one home of
    this arithmetic: ``--merge-experts`` (:class:`ExtractedFeedForward`) and the CTranslate2
    export's dense view (:mod:`taskmoe_fairseq.export.subnetwork`) both call it."""
    scale = [w.to(experts[0][2].dtype) for w in weights]
    return (
        torch.cat([fc1_weight for fc1_weight, _, _, _ in experts], dim=0),
        torch.cat([fc1_bias for _, fc1_bias, _, _ in experts], dim=0),
        torch.cat([w * fc2_weight for w, (_, _, fc2_weight, _) in zip(scale, experts)], dim=1),
        sum(w * fc2_bias for w, (_, _, _, fc2_bias) in zip(scale, experts)),
    )


def ffn_tensors(expert: ExpertFeedForward) -> FfnTensors:
    return expert.fc1.weight, expert.fc1.bias, expert.fc2.weight, expert.fc2.bias
