"""fairseq's Transformer encoder and decoder layers with a mixture of experts as FFN.

The layers run fairseq's own forward code unchanged (attention, layer norms,
dropout, residuals, pre/post-norm, incremental decoding): the MoE sits in the
slot where that code calls ``fc1``; ``activation_fn`` and ``fc2`` become
identities (the experts hold ``fc1 -> activation -> dropout -> fc2``). What the
MoE needs besides the hidden states travels as forward arguments, so
activation checkpointing recomputes it exactly:

* ``moe_expert_index`` (LongTensor) / ``moe_expert_weight`` (float32), ``[B, K]``:
  the router's per-sentence decision (task, static, sentence routing), and
  ``moe_expert_sets`` (:class:`ExpertSets`), its distinct expert sets;
* the padding mask fairseq already passes (token routing skips pads).

For the duration of one layer call the slot reads these through a context
variable set by the layer's own ``forward`` (thread- and recompute-safe: it is
set again whenever the forward runs). A token-routed layer appends its gate
loss, expert load and dropped share to its output as three tensors, so they
carry gradients through checkpointing;
:func:`taskmoe_fairseq.models.moe_scope.attach_moe_hooks` strips them off before
fairseq's loop sees the output.
"""

import contextvars
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor

from taskmoe_fairseq.modules.routing_decision import ExpertSets, RoutingDecision

#: number of tensors a token-routed layer appends to fairseq's output
AUX_OUTPUTS = 3

_CALL: contextvars.ContextVar = contextvars.ContextVar("taskmoe_feed_forward_call", default=None)


@dataclass
class _FeedForwardCall:
    moe: nn.Module
    padding_mask: Optional[Tensor]
    expert_index: Optional[Tensor]
    expert_weight: Optional[Tensor]
    expert_sets: Optional[ExpertSets]
    decision: Optional[RoutingDecision] = None


class MoeSlot(nn.Module):
    """Stands where fairseq's layer calls ``fc1``: runs the layer's MoE on ``[T, B, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        call = _CALL.get()
        if call is None:
            raise RuntimeError("MoeSlot runs only inside its MoE layer's forward")
        y, call.decision = call.moe(x, call.padding_mask, call.expert_index, call.expert_weight, call.expert_sets)
        return y


def _identity(x):
    return x


class _MoeLayer:
    """Mixin for fairseq's layer classes: builds the slot instead of ``fc1``/``fc2``."""

    def build_fc1(self, *args):
        return MoeSlot()

    def build_fc2(self, *args):
        return nn.Identity()

    def _install_moe(self, moe: nn.Module, name: str):
        self.moe = moe
        self.moe_layer_name = name  # "encoder.1": static, set once at build
        self.activation_fn = _identity  # the experts apply the activation and its dropout
        self.activation_dropout_module = nn.Identity()

    def _run(self, forward, padding_mask, expert_index, expert_weight, expert_sets, *args, **kwargs):
        call = _FeedForwardCall(self.moe, padding_mask, expert_index, expert_weight, expert_sets)
        token = _CALL.set(call)
        try:
            out = forward(*args, **kwargs)
        finally:
            _CALL.reset(token)
        if not self.moe.routes_tokens:
            return out
        decision = call.decision
        outputs = out if isinstance(out, tuple) else (out,)
        return (*outputs, decision.gate_loss, decision.expert_load, decision.dropped_share)


class MoeEncoderLayer(_MoeLayer, TransformerEncoderLayerBase):
    """fairseq's encoder layer with ``moe`` (a :class:`MoeFeedForward` or
    :class:`ExtractedFeedForward`) as its FFN; ``x``: ``[T, B, C]``."""

    def __init__(self, cfg, moe: nn.Module, name: str, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self._install_moe(moe, name)

    def forward(self, x, encoder_padding_mask, attn_mask=None, moe_expert_index=None, moe_expert_weight=None,
                moe_expert_sets=None):
        return self._run(
            super().forward, encoder_padding_mask, moe_expert_index, moe_expert_weight, moe_expert_sets,
            x, encoder_padding_mask, attn_mask,
        )


class MoeDecoderLayer(_MoeLayer, TransformerDecoderLayerBase):
    """fairseq's decoder layer with ``moe`` as its FFN (pre- or post-norm, incremental
    decoding); ``--scale-fc`` and ``--scale-resids`` act on the dense FFN and are
    rejected when the model is built."""

    def __init__(self, cfg, moe: nn.Module, name: str, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        self._install_moe(moe, name)

    def forward(self, x, *args, moe_expert_index=None, moe_expert_weight=None, moe_expert_sets=None, **kwargs):
        padding_mask = kwargs.get("self_attn_padding_mask", args[6] if len(args) > 6 else None)
        return self._run(
            super().forward, padding_mask, moe_expert_index, moe_expert_weight, moe_expert_sets, x, *args, **kwargs
        )
