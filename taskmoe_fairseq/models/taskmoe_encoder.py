"""fairseq's Transformer encoder with MoE FFNs in every ``--encoder-moe-freq``-th layer,
and the model's routing step (:class:`MoeRouter`)."""

from typing import Dict, List, Optional

from fairseq.models.transformer import TransformerEncoderBase
from torch import Tensor

from taskmoe_fairseq.models.moe_options import build_moe_layer, is_moe_layer
from taskmoe_fairseq.models.moe_scope import MoeForwardScope
from taskmoe_fairseq.models.router import MoeRouter, masked_mean

LANGUAGE_KEYS = ("src_lang_id", "tgt_lang_id")
DECODER_ROUTING_KEYS = ("moe_decoder_expert_index", "moe_decoder_expert_weight")


class TaskMoeTransformerEncoder(TransformerEncoderBase):
    """Also takes each sentence's language ids (``src_lang_id``, ``tgt_lang_id``:
    LongTensor ``[B]``, put in ``net_input`` by :mod:`taskmoe_fairseq.tasks`).

    ``forward`` routes once (the router), then runs fairseq's own encoder forward
    (layers, LayerDrop, checkpointing as in fairseq's ``transformer``), and returns
    fairseq's ``encoder_out`` plus, for the decoder and the criterion:

    * ``src_lang_id`` / ``tgt_lang_id``: ``[LongTensor [B]]``;
    * ``moe_decoder_expert_index`` / ``moe_decoder_expert_weight``: one ``[B, K]``
      tensor per routed decoder layer (in layer order), reordered with the beams;
    * ``moe_decoder_expert_sets``: their :class:`ExpertSets` (found once per batch), likewise;
    * ``moe_aux``: the encoder side's :class:`MoeAux` list (and the router's for
      the decoder's routed layers).
    """

    def __init__(self, cfg, dictionary, embed_tokens, langs: List[str]):
        super().__init__(cfg, dictionary, embed_tokens)
        self.moe_router = MoeRouter(cfg, cfg.encoder.embed_dim, langs)

    def build_encoder_layer(self, cfg):
        # fairseq builds layers in order without passing the index; count them.
        index = getattr(self, "_layers_built", 0)
        self._layers_built = index + 1
        if is_moe_layer(cfg, "encoder", index):
            return build_moe_layer(cfg, "encoder", index, return_fc=self.return_fc)
        return super().build_encoder_layer(cfg)

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        src_lang_id: Optional[Tensor] = None,
        tgt_lang_id: Optional[Tensor] = None,
    ):
        """``src_tokens``: ``[B, S]``; returns the ``encoder_out`` dict described above.

        Raises:
            TaskMoeError: task routing without language ids, or an extracted
                sub-network asked for another pair.
        """
        router = self.moe_router
        router.check_pair(src_lang_id, tgt_lang_id)
        padding_mask = src_tokens.eq(self.padding_idx)
        sentence_tokens = (~padding_mask).sum(dim=1).float()
        if token_embeddings is None and router.needs_summary("encoder"):
            token_embeddings = self.embed_tokens(src_tokens)  # fairseq reuses them: one lookup

        def embedding_summary():
            return masked_mean(self.embed_scale * token_embeddings.float(), padding_mask, time_major=False)

        routing, aux = router.route("encoder", src_lang_id, tgt_lang_id, embedding_summary, sentence_tokens)
        with MoeForwardScope(routing) as scope:
            encoder_out = super().forward(src_tokens, src_lengths, return_all_hiddens, token_embeddings)

        def output_summary():
            return masked_mean(encoder_out["encoder_out"][0].float(), padding_mask)

        decoder_routing, decoder_aux = router.route(
            "decoder", src_lang_id, tgt_lang_id, output_summary, sentence_tokens
        )
        decisions = list(decoder_routing.values())  # in layer order, as the decoder expects
        encoder_out["src_lang_id"] = [src_lang_id] if src_lang_id is not None else []
        encoder_out["tgt_lang_id"] = [tgt_lang_id] if tgt_lang_id is not None else []
        encoder_out["moe_decoder_expert_index"] = [index for index, _, _ in decisions]
        encoder_out["moe_decoder_expert_weight"] = [weight for _, weight, _ in decisions]
        encoder_out["moe_decoder_expert_sets"] = [sets for _, _, sets in decisions]
        encoder_out["moe_aux"] = aux + scope.aux + decoder_aux
        return encoder_out

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order):
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        for key in LANGUAGE_KEYS + DECODER_ROUTING_KEYS:
            reordered[key] = [tensor.index_select(0, new_order) for tensor in encoder_out.get(key, [])]
        reordered["moe_decoder_expert_sets"] = [sets.index_select(new_order) for sets in encoder_out.get("moe_decoder_expert_sets", [])]
        return reordered
