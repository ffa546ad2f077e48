"""fairseq's Transformer encoder with MoE FFNs in every ``--encoder-moe-freq``-th layer."""

from typing import Dict, List, Optional

import torch
from fairseq.models.transformer import TransformerEncoderBase
from fairseq.modules import transformer_layer
from torch import Tensor

from taskmoe_fairseq.models.moe_options import build_moe_ffn, is_moe_layer
from taskmoe_fairseq.modules.moe_transformer_layer import MoeEncoderLayer
from taskmoe_fairseq.modules.routing_decision import RoutingInputs

LANGUAGE_KEYS = ("src_lang_id", "tgt_lang_id")


class TaskMoeTransformerEncoder(TransformerEncoderBase):
    """Also takes each sentence's language ids (``src_lang_id``, ``tgt_lang_id``:
    LongTensor ``[B]``, put in ``net_input`` by :mod:`taskmoe_fairseq.tasks`) and
    returns them in ``encoder_out`` so the decoder's task routing sees the same
    task in training and in beam search (they are reordered with the beams)."""

    def build_encoder_layer(self, cfg):
        # fairseq builds layers in order without passing the index; count them.
        index = getattr(self, "_layers_built", 0)
        self._layers_built = index + 1
        if is_moe_layer(cfg, "encoder", index):
            return MoeEncoderLayer(cfg, build_moe_ffn(cfg, "encoder"))
        return transformer_layer.TransformerEncoderLayerBase(cfg)

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        src_lang_id: Optional[Tensor] = None,
        tgt_lang_id: Optional[Tensor] = None,
    ):
        """``src_tokens``: ``[B, S]``. Returns fairseq's encoder_out dict (``encoder_out``
        ``[S, B, C]``, ``encoder_padding_mask`` ``[B, S]``, ...) plus the language ids."""
        encoder_padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = encoder_padding_mask.any()
        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x) * has_pads.type_as(x))
        x = x.transpose(0, 1)  # B x T x C -> T x B x C

        routing = RoutingInputs(src_lang_id=src_lang_id, tgt_lang_id=tgt_lang_id)
        padding_mask = encoder_padding_mask if has_pads else None
        encoder_states = [x] if return_all_hiddens else []
        for layer in self.layers:
            if isinstance(layer, MoeEncoderLayer):
                x = layer(x, padding_mask, routing)
            else:
                x = layer(x, encoder_padding_mask=padding_mask)
            if return_all_hiddens:
                encoder_states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)

        src_lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [encoder_padding_mask],  # B x T
            "encoder_embedding": [encoder_embedding],  # B x T x C
            "encoder_states": encoder_states,  # List[T x B x C]
            "fc_results": [],
            "src_tokens": [],
            "src_lengths": [src_lengths],
            "src_lang_id": [src_lang_id] if src_lang_id is not None else [],  # B
            "tgt_lang_id": [tgt_lang_id] if tgt_lang_id is not None else [],  # B
        }

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order):
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        for key in LANGUAGE_KEYS:
            reordered[key] = [ids.index_select(0, new_order) for ids in encoder_out.get(key, [])]
        return reordered
