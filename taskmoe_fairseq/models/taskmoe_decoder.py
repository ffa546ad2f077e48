"""fairseq's Transformer decoder with MoE FFNs in every ``--decoder-moe-freq``-th layer."""

from typing import Dict, List, Optional

from fairseq.models.transformer import TransformerDecoderBase
from torch import Tensor

from taskmoe_fairseq.models.moe_options import build_moe_layer, is_moe_layer, routed_layers
from taskmoe_fairseq.models.moe_scope import MoeForwardScope
from taskmoe_fairseq.modules import routing_kinds


class TaskMoeTransformerDecoder(TransformerDecoderBase):
    """Routes on the decisions the encoder's router carried in ``encoder_out``
    (``moe_decoder_expert_index`` / ``moe_decoder_expert_weight``), never on its
    own input tokens: in generation the target-language tag is a forced prefix,
    so step 0 has seen only ``</s>``, while in training it has seen the tag.

    ``extract_features`` runs fairseq's own code (layers, LayerDrop, incremental
    decoding, alignment) and adds ``extra["moe_aux"]``, the token-routed layers'
    :class:`MoeAux` list.
    """

    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self.moe_routed_names = [routing_kinds.layer_name("decoder", index) for index, _ in routed_layers(cfg, "decoder")]

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        # fairseq builds layers in order without passing the index; count them.
        index = getattr(self, "_layers_built", 0)
        self._layers_built = index + 1
        if is_moe_layer(cfg, "decoder", index):
            return build_moe_layer(cfg, "decoder", index, no_encoder_attn=no_encoder_attn)
        return super().build_decoder_layer(cfg, no_encoder_attn)

    def extract_features(
        self,
        prev_output_tokens,
        encoder_out: Optional[Dict[str, List[Tensor]]] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """``prev_output_tokens``: ``[B, T]``; returns features ``[B, T, C]`` and extras."""
        routing = {}
        if self.moe_routed_names:
            indices = (encoder_out or {}).get("moe_decoder_expert_index", [])
            weights = (encoder_out or {}).get("moe_decoder_expert_weight", [])
            sets = (encoder_out or {}).get("moe_decoder_expert_sets") or [None] * len(indices)
            if len(indices) != len(self.moe_routed_names):
                raise ValueError(
                    "encoder_out carries no routing for the decoder's MoE layers; "
                    "pass the output of this model's encoder"
                )
            routing = dict(zip(self.moe_routed_names, zip(indices, weights, sets)))
        with MoeForwardScope(routing) as scope:
            x, extra = super().extract_features(
                prev_output_tokens,
                encoder_out=encoder_out,
                incremental_state=incremental_state,
                full_context_alignment=full_context_alignment,
                alignment_layer=alignment_layer,
                alignment_heads=alignment_heads,
            )
        extra["moe_aux"] = scope.aux
        return x, extra
