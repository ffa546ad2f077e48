"""fairseq's Transformer decoder with MoE FFNs in every ``--decoder-moe-freq``-th layer."""

from typing import Dict, List, Optional

from fairseq.modules import transformer_layer
from fairseq.models.transformer import TransformerDecoderBase
from torch import Tensor

from taskmoe_fairseq.models.moe_options import build_moe_ffn, is_moe_layer
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.moe_feed_forward import masked_mean
from taskmoe_fairseq.modules.moe_transformer_layer import MoeDecoderLayer
from taskmoe_fairseq.modules.routing_decision import RoutingInputs


def _first(encoder_out: Optional[Dict[str, List[Tensor]]], key: str) -> Optional[Tensor]:
    if encoder_out is None or len(encoder_out.get(key, [])) == 0:
        return None
    return encoder_out[key][0]


class TaskMoeTransformerDecoder(TransformerDecoderBase):
    """Routes on the task carried in ``encoder_out`` rather than on its own
    input tokens: in generation the target-language tag is a forced prefix, so
    step 0 has seen only ``</s>``, while in training it has seen the tag.

    Sentence routing in the decoder gates on the mean of the encoder output
    (the source sentence): a mean over the target tokens would let every
    position see the future in training and differ from incremental decoding.
    """

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        # fairseq builds layers in order without passing the index; count them.
        index = getattr(self, "_layers_built", 0)
        self._layers_built = index + 1
        if is_moe_layer(cfg, "decoder", index):
            return MoeDecoderLayer(cfg, build_moe_ffn(cfg, "decoder"), no_encoder_attn=no_encoder_attn)
        return transformer_layer.TransformerDecoderLayerBase(cfg, no_encoder_attn)

    def reorder_incremental_state_scripting(self, incremental_state, new_order: Tensor):
        """fairseq checks every module for ``reorder_incremental_state`` at every decoding step;
        each expert adds four modules, so that walk grows with E (profiled: the main reason the
        full model's decoding slowed with E). The stateful modules are fixed once the model is
        built: list them once, in fairseq's order."""
        stateful = self.__dict__.get("_stateful_modules")
        if stateful is None:
            stateful = [module for module in self.modules() if hasattr(module, "reorder_incremental_state")]
            self.__dict__["_stateful_modules"] = stateful  # a plain list: not registered as submodules
        for module in stateful:
            result = module.reorder_incremental_state(incremental_state, new_order)
            if result is not None:
                incremental_state = result

    def extract_features_scriptable(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[Dict[str, List[Tensor]]],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """``prev_output_tokens``: ``[B, T]``; returns features ``[B, T, C]`` and extras."""
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc = _first(encoder_out, "encoder_out")
        padding_mask = _first(encoder_out, "encoder_padding_mask")

        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        x = x.transpose(0, 1)  # B x T x C -> T x B x C

        self_attn_padding_mask: Optional[Tensor] = None
        if prev_output_tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = prev_output_tokens.eq(self.padding_idx)

        routing = RoutingInputs(
            src_lang_id=_first(encoder_out, "src_lang_id"),
            tgt_lang_id=_first(encoder_out, "tgt_lang_id"),
            sentence_summary=(
                masked_mean(enc, padding_mask)
                if enc is not None and self.cfg.decoder_moe_routing == routing_kinds.SENTENCE
                else None
            ),
        )

        attn: Optional[Tensor] = None
        inner_states: List[Optional[Tensor]] = [x]
        for idx, layer in enumerate(self.layers):
            self_attn_mask = (
                self.buffered_future_mask(x) if incremental_state is None and not full_context_alignment else None
            )
            common = dict(
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=bool(idx == alignment_layer),
                need_head_weights=bool(idx == alignment_layer),
            )
            if isinstance(layer, MoeDecoderLayer):
                x, layer_attn, _ = layer(x, enc, padding_mask, incremental_state, routing, **common)
            else:
                x, layer_attn, _ = layer(x, enc, padding_mask, incremental_state, **common)
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)

        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)  # average over heads
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # T x B x C -> B x T x C
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": inner_states}
