"""Transformer encoder and decoder layers whose FFN is a mixture of experts.

Attention, layer norms, dropout and residuals are fairseq's own
(``TransformerEncoderLayerBase`` / ``TransformerDecoderLayerBase``); only the
FFN sublayer changes, and it also receives the padding mask and the
:class:`RoutingInputs` of the batch.
"""

from typing import Dict, Optional

import torch.nn as nn
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor

from taskmoe_fairseq.modules.routing_decision import RoutingInputs


class ExpertsOwnTheFeedForward:
    """Mixin: fairseq's layer builds no dense ``fc1``/``fc2``; the experts hold those weights."""

    def build_fc1(self, *args):
        return None

    def build_fc2(self, *args):
        return None


class MoeEncoderLayer(ExpertsOwnTheFeedForward, TransformerEncoderLayerBase):
    """Encoder layer: self-attention, then ``moe_ffn`` in place of ``fc1``/``fc2``."""

    def __init__(self, cfg, moe_ffn: nn.Module):
        super().__init__(cfg)
        self.moe = moe_ffn

    def forward(self, x: Tensor, encoder_padding_mask: Optional[Tensor], routing: RoutingInputs):
        """``x``: ``[T, B, C]``; ``encoder_padding_mask``: ``[B, T]`` (True = pad) or None."""
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask, need_weights=False)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.moe(x, encoder_padding_mask, routing)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x


class MoeDecoderLayer(ExpertsOwnTheFeedForward, TransformerDecoderLayerBase):
    """Decoder layer: self-attention, encoder attention, then ``moe_ffn``.

    Supports fairseq's standard decoder layer (pre- or post-norm, incremental
    decoding); the experimental ``--cross-self-attention``, ``--scale-attn``,
    ``--scale-heads``, ``--scale-fc`` and ``--scale-resids`` are rejected when
    the model is built.
    """

    def __init__(self, cfg, moe_ffn: nn.Module, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        self.moe = moe_ffn

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor],
        encoder_padding_mask: Optional[Tensor],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]],
        routing: RoutingInputs,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        """``x``: ``[T, B, C]``; returns ``(x, attention or None, None)`` like fairseq's layer."""
        if need_head_weights:
            need_attn = True
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(
            query=x,
            key=x,
            value=x,
            key_padding_mask=self_attn_padding_mask,
            incremental_state=incremental_state,
            need_weights=False,
            attn_mask=self_attn_mask,
        )
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        attn: Optional[Tensor] = None
        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            x, attn = self.encoder_attn(
                query=x,
                key=encoder_out,
                value=encoder_out,
                key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights,
            )
            x = self.residual_connection(self.dropout_module(x), residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.moe(x, self_attn_padding_mask, routing)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, attn, None
