"""fairseq's Transformer encoder and decoder layers with a mixture of experts as FFN.

The forwards are written out, as in fairseq's MoE branch
(``fairseq/modules/transformer_layer.py`` on its ``moe`` branch): the attention,
layer norms, dropout and residuals of fairseq's ``TransformerEncoderLayerBase`` /
``TransformerDecoderLayerBase`` (same submodules, same parameter names, so state
dicts are those of fairseq's layers less ``fc1``/``fc2``, plus ``moe``), and
``self.moe(...)`` where fairseq calls ``fc1 -> activation -> dropout -> fc2``
(the experts hold those). As in fairseq's dense layer, the FFN's output goes
through ``dropout_module`` before the residual.

Besides fairseq's arguments, a layer takes what its MoE needs as ordinary
forward arguments, so activation checkpointing (fairseq's ``checkpoint_wrapper``)
saves them with the inputs and replays them when it recomputes the forward:

* ``moe_expert_index`` (LongTensor) / ``moe_expert_weight`` (float32), ``[B, K]``:
  the router's per-sentence decision (task, static, sentence routing), and
  ``moe_expert_sets`` (:class:`ExpertSets`), its distinct expert sets;
* the padding mask fairseq already passes (token routing skips pads).

A token-routed layer returns its gate loss, expert load and dropped share after
fairseq's outputs (:data:`AUX_OUTPUTS` tensors). They are outputs, not values
stored on the side, because under activation checkpointing the first forward
runs without gradient and the recompute happens in backward: only the
checkpointed function's outputs carry the gate loss's gradient.
:mod:`taskmoe_fairseq.models.moe_scope` passes the routing in and takes the aux
off (one forward scope, two hooks that run outside the checkpointed forward),
so fairseq's encoder and decoder loops run unchanged.
"""

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor

from taskmoe_fairseq.modules.routing_decision import ExpertSets

#: number of tensors a token-routed layer appends to fairseq's output: gate loss, expert load, dropped share
AUX_OUTPUTS = 3


class _MoeLayer:
    """What both layers share: no dense FFN (fairseq's ``build_fc1``/``build_fc2`` build
    nothing, so no random numbers are drawn for it), the MoE instead."""

    def build_fc1(self, *args):
        return None

    def build_fc2(self, *args):
        return None

    def _install_moe(self, moe: nn.Module, name: str):
        # fairseq's __init__ set these for its dense FFN; the experts hold the activation and its dropout
        del self.fc1, self.fc2, self.activation_fn, self.activation_dropout_module
        self.moe = moe
        self.moe_layer_name = name  # "encoder.1": static, set once at build

    def _moe_sublayer(self, x: Tensor, padding_mask, expert_index, expert_weight, expert_sets, resid_scale=None):
        """The FFN sublayer of fairseq's layers with the MoE in the FFN's place: layer norm before (pre-norm)
        or after (post-norm), dropout and the residual (scaled by ``resid_scale``, the decoder's
        ``--scale-resids``). ``x``: ``[T, B, C]``; returns ``x``, the MoE's output before dropout
        (fairseq's ``fc_result``) and the aux tensors (empty unless token-routed)."""
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        y, decision = self.moe(x, padding_mask, expert_index, expert_weight, expert_sets)
        if resid_scale is not None:
            residual = torch.mul(resid_scale, residual)
        x = self.residual_connection(self.dropout_module(y), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        aux = (decision.gate_loss, decision.expert_load, decision.dropped_share) if self.moe.routes_tokens else ()
        return x, y, aux


class MoeEncoderLayer(_MoeLayer, TransformerEncoderLayerBase):
    """fairseq's encoder layer with ``moe`` (a :class:`MoeFeedForward` or
    :class:`ExtractedFeedForward`) as its FFN; ``x``: ``[T, B, C]``."""

    def __init__(self, cfg, moe: nn.Module, name: str, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self._install_moe(moe, name)

    def forward(
        self,
        x: Tensor,
        encoder_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
        moe_expert_index: Optional[Tensor] = None,
        moe_expert_weight: Optional[Tensor] = None,
        moe_expert_sets: Optional[ExpertSets] = None,
    ):
        """fairseq's ``TransformerEncoderLayerBase.forward``: ``x`` ``[T, B, C]``,
        ``encoder_padding_mask`` ``[B, T]`` (True = pad) or None, ``attn_mask`` ``[T, T]``;
        ``moe_*``: the router's decision (see the module docstring).

        Returns ``x`` ``[T, B, C]`` (with ``return_fc``: ``(x, fc_result)``, the MoE's output
        before dropout), followed by the :data:`AUX_OUTPUTS` aux tensors if token-routed.

        Raises:
            ValueError: a per-sentence layer called without a decision (from the MoE).
        """
        if attn_mask is not None:
            # fairseq: a large negative number, not -inf (a fully masked row would give NaN)
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(
            query=x, key=x, value=x, key_padding_mask=encoder_padding_mask, need_weights=False, attn_mask=attn_mask
        )
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        x, fc_result, aux = self._moe_sublayer(
            x, encoder_padding_mask, moe_expert_index, moe_expert_weight, moe_expert_sets
        )

        outputs = (x, fc_result) if self.return_fc and not torch.jit.is_scripting() else (x,)
        outputs = outputs + aux
        return outputs[0] if len(outputs) == 1 else outputs


class MoeDecoderLayer(_MoeLayer, TransformerDecoderLayerBase):
    """fairseq's decoder layer with ``moe`` as its FFN (pre- or post-norm, incremental
    decoding, encoder attention, ``--scale-attn``, ``--scale-heads``, ``--scale-resids``);
    ``--scale-fc`` normalises the dense FFN's hidden units, which an MoE layer does not have,
    and is refused when the model is built."""

    def __init__(self, cfg, moe: nn.Module, name: str, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        self._install_moe(moe, name)

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
        moe_expert_index: Optional[Tensor] = None,
        moe_expert_weight: Optional[Tensor] = None,
        moe_expert_sets: Optional[ExpertSets] = None,
    ):
        """fairseq's ``TransformerDecoderLayerBase.forward``: ``x`` ``[T, B, C]``,
        ``encoder_out`` ``[S, B, C]``, ``encoder_padding_mask`` ``[B, S]``,
        ``self_attn_padding_mask`` ``[B, T]`` (True = pad; also the MoE's padding mask);
        ``moe_*``: the router's decision (see the module docstring).

        Returns ``(x [T, B, C], attn, self_attn_state)`` as fairseq's layer (``attn``: the
        encoder attention ``[B, T, S]``, or per head with ``need_head_weights``, when asked;
        ``self_attn_state`` only when traced for ONNX), followed by the :data:`AUX_OUTPUTS`
        aux tensors if token-routed.

        Raises:
            ValueError: a per-sentence layer called without a decision (from the MoE).
        """
        if need_head_weights:
            need_attn = True
        moe_padding_mask = self_attn_padding_mask  # [B, T]; cross-self-attention widens the attention's own

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        if prev_self_attn_state is not None:
            assert incremental_state is not None
            self.self_attn._set_input_buffer(incremental_state, _saved_state(prev_self_attn_state))
        self_attn_buffer = self.self_attn._get_input_buffer(incremental_state)
        y = x
        if self.cross_self_attention and not (
            incremental_state is not None and self_attn_buffer is not None and "prev_key" in self_attn_buffer
        ):
            # attend to the source and the target prefix at once: widen the masks by the source positions
            assert encoder_out is not None
            if self_attn_mask is not None:
                self_attn_mask = torch.cat((x.new_zeros(x.size(0), encoder_out.size(0)), self_attn_mask), dim=1)
            if self_attn_padding_mask is not None:
                if encoder_padding_mask is None:
                    encoder_padding_mask = self_attn_padding_mask.new_zeros(encoder_out.size(1), encoder_out.size(0))
                self_attn_padding_mask = torch.cat((encoder_padding_mask, self_attn_padding_mask), dim=1)
            y = torch.cat((encoder_out, x), dim=0)
        x, attn = self.self_attn(
            query=x,
            key=y,
            value=y,
            key_padding_mask=self_attn_padding_mask,
            incremental_state=incremental_state,
            need_weights=False,
            attn_mask=self_attn_mask,
        )
        if self.c_attn is not None:  # --scale-heads
            tgt_len, bsz = x.size(0), x.size(1)
            x = torch.einsum("tbhd,h->tbhd", x.view(tgt_len, bsz, self.nh, self.head_dim), self.c_attn)
            x = x.reshape(tgt_len, bsz, self.embed_dim)
        if self.attn_ln is not None:  # --scale-attn
            x = self.attn_ln(x)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            if prev_attn_state is not None:
                assert incremental_state is not None
                self.encoder_attn._set_input_buffer(incremental_state, _saved_state(prev_attn_state))
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

        x, _, aux = self._moe_sublayer(  # self.w_resid: --scale-resids
            x, moe_padding_mask, moe_expert_index, moe_expert_weight, moe_expert_sets, resid_scale=self.w_resid
        )

        self_attn_state = None
        if self.onnx_trace and incremental_state is not None:
            saved = self.self_attn._get_input_buffer(incremental_state)
            assert saved is not None
            self_attn_state = [saved["prev_key"], saved["prev_value"]]
            if self_attn_padding_mask is not None:
                self_attn_state.append(saved["prev_key_padding_mask"])
        return (x, attn, self_attn_state) + aux


def _saved_state(prev_state: List[Tensor]) -> Dict[str, Optional[Tensor]]:
    """An attention's incremental buffer from ``[prev_key, prev_value(, prev_key_padding_mask)]``."""
    saved: Dict[str, Optional[Tensor]] = {"prev_key": prev_state[0], "prev_value": prev_state[1]}
    if len(prev_state) >= 3:
        saved["prev_key_padding_mask"] = prev_state[2]
    return saved
