"""``taskmoe_transformer``: a Transformer whose FFN in every other layer is a
mixture of E experts, routed by token, sentence or task, chosen separately for
encoder and decoder (Kudugunta et al., 2021, "Beyond Distillation: Task-level
Mixture-of-Experts for Efficient Inference", arXiv 2110.03742).

With ``--encoder-moe-freq 0 --decoder-moe-freq 0`` it is exactly fairseq's
``transformer`` (same layers, same parameter names).
"""

import logging
from typing import Iterator, Optional, Tuple

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture
from torch import Tensor

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.moe_options import SIDES, add_moe_args, check_moe_args, namespace_summary, set_moe_defaults
from taskmoe_fairseq.models.taskmoe_decoder import TaskMoeTransformerDecoder
from taskmoe_fairseq.models.taskmoe_encoder import TaskMoeTransformerEncoder
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward

logger = logging.getLogger(__name__)


def needs_language_ids(args) -> bool:
    """Whether some MoE layer still routes on the languages (not yet extracted)."""
    return any(
        getattr(args, f"{side}_moe_freq") > 0
        and routing_kinds.task_key(getattr(args, f"{side}_moe_routing")) is not None
        and not args.moe_extracted_lang_pair
        for side in SIDES
    )


@register_model("taskmoe_transformer")
class TaskMoeTransformerModel(TransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        taskmoe_base_architecture(args)
        task_langs = getattr(task, "langs", None)
        saved_langs = getattr(args, "taskmoe_langs", None)
        if saved_langs is None:
            args.taskmoe_langs = list(task_langs or [])
        elif task_langs is not None and list(task_langs) != list(saved_langs):
            raise usage_error(
                f"the model was trained with --langs {','.join(saved_langs)} but the task has "
                f"{','.join(task_langs)}; pass --langs {','.join(saved_langs)} (language ids follow its order)"
            )
        check_moe_args(args, len(args.taskmoe_langs))
        if needs_language_ids(args) and not getattr(task, "provides_language_ids", False):
            raise usage_error(
                "this model routes by language; run it with --task multilingual_translation_taskmoe "
                f"(got --task {getattr(args, 'task', type(task).__name__)})"
            )
        logger.info("taskmoe_transformer: %s", namespace_summary(args))
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return TaskMoeTransformerEncoder(cfg, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        return TaskMoeTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Tensor,
        prev_output_tokens: Tensor,
        src_lang_id: Optional[Tensor] = None,
        tgt_lang_id: Optional[Tensor] = None,
        return_all_hiddens: bool = True,
        features_only: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """As fairseq's ``TransformerModel.forward``, plus language ids ``[B]``."""
        encoder_out = self.encoder(
            src_tokens,
            src_lengths=src_lengths,
            return_all_hiddens=return_all_hiddens,
            src_lang_id=src_lang_id,
            tgt_lang_id=tgt_lang_id,
        )
        return self.decoder(
            prev_output_tokens,
            encoder_out=encoder_out,
            features_only=features_only,
            alignment_layer=alignment_layer,
            alignment_heads=alignment_heads,
            src_lengths=src_lengths,
            return_all_hiddens=return_all_hiddens,
        )

    def moe_layers(self) -> Iterator[Tuple[str, MoeFeedForward]]:
        """``("encoder.1", layer)``-style names and the routed MoE FFNs, in order."""
        for side in SIDES:
            for index, layer in enumerate(getattr(self, side).layers):
                if isinstance(getattr(layer, "moe", None), MoeFeedForward):
                    yield f"{side}.{index}", layer.moe


@register_model_architecture("taskmoe_transformer", "taskmoe_transformer")
def taskmoe_base_architecture(args):
    """The paper's Transformer-Base: 6+6 layers, d_model 512, FFN 2048, 8 heads; 32 experts, top-2."""
    set_moe_defaults(args, num_experts=32)
    base_architecture(args)


@register_model_architecture("taskmoe_transformer", "taskmoe_transformer_small")
def taskmoe_small_architecture(args):
    """CPU-sized: 3+3 layers, d_model 256, FFN 1024, 4 heads, 8 experts (MoE in layer 2 of each side)."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_layers = getattr(args, "encoder_layers", 3)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 3)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    set_moe_defaults(args, num_experts=8)
    base_architecture(args)


@register_model_architecture("taskmoe_transformer", "taskmoe_transformer_tiny")
def taskmoe_tiny_architecture(args):
    """For tests and examples: 2+2 layers, d_model 64, FFN 128, 2 heads, 4 experts."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 2)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 2)
    set_moe_defaults(args, num_experts=4)
    base_architecture(args)
