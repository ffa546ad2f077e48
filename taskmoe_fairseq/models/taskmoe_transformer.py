"""``taskmoe_transformer``: a Transformer whose FFN in every other layer is a
mixture of E experts, routed by token, sentence or task, chosen separately for
encoder and decoder (Kudugunta et al., 2021, "Beyond Distillation: Task-level
Mixture-of-Experts for Efficient Inference", arXiv 2110.03742).

With ``--encoder-moe-freq 0 --decoder-moe-freq 0`` it is exactly fairseq's
``transformer`` (same layers, same parameter names).
"""

import logging
import re
from typing import Iterator, Optional, Tuple

import torch
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture
from torch import Tensor

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models import adding, identity, upcycling
from taskmoe_fairseq.models.moe_options import SIDES, add_moe_args, check_moe_args, namespace_summary, set_moe_defaults
from taskmoe_fairseq.models.taskmoe_decoder import TaskMoeTransformerDecoder
from taskmoe_fairseq.models.router import gate_key_prefix
from taskmoe_fairseq.models.taskmoe_encoder import TaskMoeTransformerEncoder
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.expert_feed_forward import stack_expert_state

logger = logging.getLogger(__name__)


def check_languages(args, task):
    """The model's language list is the task's (ids follow its order); saved in the args
    (``taskmoe_langs``, see :mod:`taskmoe_fairseq.models.identity`). A model loaded from a
    checkpoint (generation, the hub, serving) refuses a task with another ``--langs`` order or
    language-tag scheme (``taskmoe_language_tags``)."""
    task_langs = getattr(task, "langs", None)
    saved_langs = getattr(args, "taskmoe_langs", None)
    if saved_langs is None:
        args.taskmoe_langs = list(task_langs or [])
    elif task_langs is not None:
        identity.check_language_order(saved_langs, task_langs)
    # the language-tag scheme (--encoder-langtok, --decoder-langtok) is the task signal: saved, then checked
    task_tags = identity.language_tags(getattr(task, "args", None))
    saved_tags = getattr(args, "taskmoe_language_tags", None)
    if saved_tags is None:
        args.taskmoe_language_tags = task_tags
    elif task_tags is not None:
        identity.check_language_tags(saved_tags, task_tags)


def expert_parameter_count(model) -> Tuple[int, int]:
    """``(expert parameters, all parameters)`` of a model: the elements of every MoE layer's experts
    (:class:`MoeFeedForward`'s ``experts``; gates and dense FFNs not counted), whether or not
    they carry fairseq's ``param.expert`` tag (set only under expert parallelism)."""
    experts = sum(p.numel() for module in model.modules() if isinstance(module, MoeFeedForward) for p in module.experts.parameters())
    return experts, sum(p.numel() for p in model.parameters())


@register_model("taskmoe_transformer")
class TaskMoeTransformerModel(TransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        taskmoe_base_architecture(args)
        check_languages(args, task)
        check_moe_args(args, len(args.taskmoe_langs))
        adding.check_add_request(args, args.taskmoe_langs)
        model = super().build_model(args, task)
        model.args = args  # the legacy namespace (fairseq's base class keeps its TransformerConfig here)
        if model.encoder.moe_router.needs_language_ids() and not getattr(task, "provides_language_ids", False):
            raise usage_error(
                "this model routes by language; run it with --task multilingual_translation_taskmoe "
                f"(got --task {getattr(args, 'task', type(task).__name__)})"
            )
        experts, total = expert_parameter_count(model)
        layers = sum(1 for module in model.modules() if isinstance(module, MoeFeedForward))
        # fairseq-train's "num. expert model params" counts parameters tagged ``param.expert``, which only
        # expert parallelism sets (fairseq's legacy_ddp skips their all-reduce): here it is 0 otherwise
        logger.info(
            "taskmoe_transformer: %s; expert parameters: %s of %s (%d MoE layers%s)", namespace_summary(args),
            f"{experts:,}", f"{total:,}", layers, "; this rank's experts" if (getattr(args, "moe_expert_parallel_size", 1) or 1) > 1 else "",
        )
        return model

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
        """fairseq's hub loading (``source_lang=``, ``target_lang=``, ``bpe="sentencepiece"``,
        ``sentencepiece_model=`` ... as keyword arguments); returns a
        :class:`TaskMoeHubInterface` whose ``translate`` strips the language tags.

        As in ``fairseq.hub_utils.from_pretrained``, ``data_name_or_path="."`` (the default) reads
        the dictionaries from the checkpoint's folder, where ``python -m taskmoe_fairseq.extract``
        puts them; with ``bpe="sentencepiece"`` and no ``sentencepiece_model``, the data folder's
        ``spm.model`` is used when it has one (fairseq itself only looks for
        ``sentencepiece.bpe.model``)."""
        import os

        from fairseq import hub_utils

        from taskmoe_fairseq.extract.assets import SPM_MODEL
        from taskmoe_fairseq.models.hub_interface import TaskMoeHubInterface

        if kwargs.get("bpe") == "sentencepiece" and "sentencepiece_model" not in kwargs:
            data = os.path.join(model_name_or_path, data_name_or_path) if data_name_or_path.startswith(".") else data_name_or_path
            if os.path.isfile(os.path.join(data, SPM_MODEL)):
                kwargs["sentencepiece_model"] = os.path.abspath(os.path.join(data, SPM_MODEL))

        loaded = hub_utils.from_pretrained(
            model_name_or_path, checkpoint_file, data_name_or_path, archive_map=cls.hub_models(), **kwargs
        )
        return TaskMoeHubInterface(loaded["args"], loaded["task"], loaded["models"])

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return TaskMoeTransformerEncoder(cfg, src_dict, embed_tokens, langs=cfg.taskmoe_langs or [])

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
        """As fairseq's ``TransformerModel.forward``, plus language ids ``[B]``.

        ``net_output[1]["moe_aux"]`` lists every MoE layer's :class:`MoeAux` of this
        forward (router decisions and token gates, encoder and decoder).
        """
        encoder_out = self.encoder(
            src_tokens,
            src_lengths=src_lengths,
            return_all_hiddens=return_all_hiddens,
            src_lang_id=src_lang_id,
            tgt_lang_id=tgt_lang_id,
        )
        logits, extra = self.decoder(
            prev_output_tokens,
            encoder_out=encoder_out,
            features_only=features_only,
            alignment_layer=alignment_layer,
            alignment_heads=alignment_heads,
            src_lengths=src_lengths,
            return_all_hiddens=return_all_hiddens,
        )
        extra["moe_aux"] = encoder_out["moe_aux"] + extra["moe_aux"]
        return logits, extra

    def moe_layers(self) -> Iterator[Tuple[str, MoeFeedForward]]:
        """``("encoder.1", moe)`` names and the (unextracted) MoE FFNs, in order."""
        for side in SIDES:
            for index, layer in enumerate(getattr(self, side).layers):
                if isinstance(getattr(layer, "moe", None), MoeFeedForward):
                    yield routing_kinds.layer_name(side, index), layer.moe

    def extract(self, lang_pair: str, merge: bool = False):
        """The sub-network of ``lang_pair``: a new model whose task-routed and static MoE
        layers keep only the pair's k experts (``merge``: folded into one FFN of width
        k x FFN), with the gate weights frozen in; everything else is copied.

        Returns ``(model, rows)``: the extracted :class:`TaskMoeTransformerModel` (its args
        record the pair) and one report row per extracted layer.

        Raises:
            TaskMoeError: already extracted, unknown language, or nothing to extract.
        """
        from taskmoe_fairseq.models.extraction import extract_model

        return extract_model(self, lang_pair, merge)

    def prune_token_experts(self, lang_pair: str, batches, keep: int, metric: str = "load", merge: bool = False):
        """The sub-network of ``lang_pair`` with every token-routed layer pruned to the ``keep``
        experts the pair's tokens use most (:mod:`taskmoe_fairseq.models.pruning`), measured by
        running this model (teacher-forced, no gradient) on ``batches``; task-routed and static
        layers extracted exactly as by :meth:`extract`.

        Args:
            batches: iterable of fairseq ``net_input`` dicts of the pair (``src_tokens`` ``[B, S]``,
                ``src_lengths`` ``[B]``, ``src_lang_id``/``tgt_lang_id`` ``[B]``, and
                ``prev_output_tokens`` ``[B, T]``; without it only the encoder runs, which
                needs every token-routed layer to be in the encoder).
            keep: K, experts kept per token-routed layer (1: a dense FFN; E: the full layer).
            metric: ``load`` (share of top-k assignments) or ``importance`` (summed gate probability).
        Returns:
            ``(model, rows)``: the pruned :class:`TaskMoeTransformerModel` (its args record the
            pair and ``moe_pruned_token_experts = K``) and one report row per pruned or
            extracted layer (pruned rows: kept experts most used first, their share of the
            pair's top-k assignments).
        Raises:
            TaskMoeError: K out of range, no token-routed layer, already extracted, a sample
                without tokens, or decoder token routing without target tokens.
        """
        from taskmoe_fairseq.models.extraction import extract_model
        from taskmoe_fairseq.models.pruning import (
            ExpertUsage, check_prune_request, choose_experts, token_routed_layers, usage_rows,
        )

        if getattr(self.args, "moe_extracted_lang_pair", None):
            raise usage_error(f"already extracted for {self.args.moe_extracted_lang_pair}; prune the full checkpoint")
        check_prune_request(self.args, keep)
        layers = token_routed_layers(self.args)
        was_training = self.training
        self.eval()
        try:
            with ExpertUsage(self, layers) as usage, torch.no_grad():
                for net_input in batches:
                    if "prev_output_tokens" in net_input:
                        self(**net_input)
                    elif any(side == "decoder" for side, _ in layers):
                        raise usage_error(
                            "the decoder routes per token, so pruning needs the pair's target text: "
                            "pass a split of the binarized data (--pruning-data valid), not source text"
                        )
                    else:
                        self.encoder(**net_input)
        finally:
            self.train(was_training)
        kept = choose_experts(usage, metric, keep)
        rows = usage_rows(usage, kept, metric, int(self.args.moe_expert_count))
        return extract_model(self, lang_pair, merge, token_experts=kept, token_rows=rows)

    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints from before the router kept per-sentence gates in their layers
        (``decoder.layers.1.moe.gate.task_logits``); they now live in the router
        (``encoder.moe_router.gates.decoder_1.task_logits``). Checkpoints from before experts were
        stacked (``...moe.experts.{e}.fc1.weight``, one module per expert) get each MoE layer's
        stacked tensors (``...moe.experts.fc1_weight [E, F, C]``,
        :func:`~taskmoe_fairseq.modules.expert_feed_forward.stack_expert_state`); extracted layers
        keep per-expert modules. With ``--moe-upcycle``, a dense model's state dict becomes this
        model's (:mod:`taskmoe_fairseq.models.upcycling`).

        Raises:
            TaskMoeError: a dense FFN where this model has experts, without ``--moe-upcycle``;
                with it, a dense model of other sizes.
        """
        prefix = f"{name}." if name else ""
        for layer, _ in self.moe_layers():
            side, index = layer.split(".")
            stack_expert_state(state_dict, f"{prefix}{side}.layers.{index}.moe.experts.")
        for key in list(state_dict):
            match = re.fullmatch(rf"{re.escape(prefix)}(encoder|decoder)\.layers\.(\d+)\.moe\.gate\.(task_logits|wg\.weight)", key)
            if match is None:
                continue
            side, index, param = match.groups()
            if getattr(self.args, f"{side}_moe_routing") == routing_kinds.TOKEN:
                continue
            state_dict[f"{prefix}{gate_key_prefix(side, int(index))}{param}"] = state_dict.pop(key)
        # a dense model's weights (--finetune-from-model): experts from its FFNs, or one line
        if getattr(self.args, "moe_upcycle", False):
            upcycling.upcycle_state_dict(self, state_dict, prefix)
        else:
            upcycling.check_dense_checkpoint(self, state_dict, prefix)
        super().upgrade_state_dict_named(state_dict, name)
        # --moe-add-langs: the checkpoint before adding takes the grown shapes; a model being trained
        # holds its new rows apart (taskmoe_fairseq.models.adding)
        if adding.added_langs(self.args):
            adding.grow_state_dict(self, state_dict, prefix)
            if not prefix:
                adding.split_loaded_state(self, state_dict)

    def state_dict(self, *args, **kwargs):
        """nn.Module's, with the tensors whose new rows train apart (``--moe-add-langs``,
        :func:`taskmoe_fairseq.models.adding.freeze_for_adding`) combined under their own names: the
        checkpoint has fairseq's ordinary layout."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return adding.combined_state_dict(self, state, prefix)



@register_model_architecture("taskmoe_transformer", "taskmoe_transformer")
def taskmoe_base_architecture(args):
    """The paper's Transformer-Base: 6+6 layers, d_model 512, FFN 2048, 8 heads; 32 experts, top-2."""
    set_moe_defaults(args, num_experts=32)
    base_architecture(args)


def _cpu_preset(args, embed_dim, ffn_dim, layers, heads, num_experts):
    """Defaults of a small preset (options given on the command line win); the decoder's widths
    follow the encoder's as in fairseq's ``base_architecture``."""
    for name, value in (("encoder_embed_dim", embed_dim), ("encoder_ffn_embed_dim", ffn_dim),
                        ("encoder_layers", layers), ("encoder_attention_heads", heads),
                        ("decoder_layers", layers), ("decoder_attention_heads", heads)):
        setattr(args, name, getattr(args, name, value))
    set_moe_defaults(args, num_experts=num_experts)
    base_architecture(args)


@register_model_architecture("taskmoe_transformer", "taskmoe_transformer_small")
def taskmoe_small_architecture(args):
    """CPU-sized: 3+3 layers, d_model 256, FFN 1024, 4 heads, 8 experts (MoE in layer 2 of each side)."""
    _cpu_preset(args, embed_dim=256, ffn_dim=1024, layers=3, heads=4, num_experts=8)


@register_model_architecture("taskmoe_transformer", "taskmoe_transformer_tiny")
def taskmoe_tiny_architecture(args):
    """For tests and examples: 2+2 layers, d_model 64, FFN 128, 2 heads, 4 experts."""
    _cpu_preset(args, embed_dim=64, ffn_dim=128, layers=2, heads=2, num_experts=4)
