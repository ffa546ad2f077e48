"""The model's MoE options (named as in fairseq's MoE branch), their checks, and
the factories that build a layer's FFN and the layer from them."""

import argparse
from typing import List, Tuple

import torch.nn as nn
from fairseq.distributed import fsdp_wrap
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.moe_scope import attach_moe_hooks
from taskmoe_fairseq.expert_parallel import dispatch as expert_parallel
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.moe_transformer_layer import MoeDecoderLayer, MoeEncoderLayer
from taskmoe_fairseq.modules.token_gate import SECOND_EXPERT_POLICIES, TokenTopKGate

SIDES = ("encoder", "decoder")
# --scale-fc puts a LayerNorm on the dense FFN's hidden units, which an MoE layer does not have
UNSUPPORTED_OPTIONS = ("scale_fc",)


def add_moe_args(parser):
    # fmt: off
    parser.add_argument("--moe-expert-count", type=int, metavar="E",
                        help="experts in every MoE layer")
    parser.add_argument("--moe-top-k", type=int, metavar="K",
                        help="experts each token (or task) is routed to (default 2, as in the paper)")
    for side, default in (("encoder", "token"), ("decoder", "target")):
        parser.add_argument(f"--{side}-moe-freq", type=int, metavar="N",
                            help=f"MoE FFN in every N-th {side} layer (layers N, 2N, ...); 0 = dense "
                                 "(default 2: every other layer, as in the paper)")
        parser.add_argument(f"--{side}-moe-routing", choices=routing_kinds.ROUTING_CHOICES,
                            help=f"{side} routing: token | sentence | task by source, target or pair "
                                 f"language | static-<key> (default {default})")
    parser.add_argument("--moe-capacity-factor", type=float, metavar="F",
                        help="token routing in training: expert capacity is F * k * tokens / E, "
                             "assignments beyond it are dropped (default 1.25)")
    parser.add_argument("--moe-eval-capacity-factor", type=float, metavar="F",
                        help="the same at evaluation and generation; <= 0 drops nothing (default 0)")
    parser.add_argument("--moe-second-expert-policy", choices=SECOND_EXPERT_POLICIES,
                        help="token routing in training: keep 'all' second choices, pick them by "
                             "gumbel 'sampling', or keep them at 'random' with probability 2*w2 "
                             "(default sampling)")
    parser.add_argument("--moe-task-gate-weights", choices=("top-k", "softmax"),
                        help="task gates: 'top-k' renormalises the k chosen probabilities to sum to 1 "
                             "(GShard); 'softmax' keeps them as they are, so the cross-entropy's gradient "
                             "reaches every expert's logit (default top-k; see docs/quickstart/gates.md)")
    parser.add_argument("--moe-task-gate-init", choices=("random", "static"),
                        help="task gates' initial logits: 'random' N(0, 1), or 'static', a warm start on the "
                             "static baseline's experts (task t on (t*k + j) mod E; default random)")
    parser.add_argument("--moe-upcycle", action="store_true",
                        help="sparse upcycling: with --finetune-from-model DENSE.pt (this model trained with "
                             "--encoder-moe-freq 0 --decoder-moe-freq 0), every expert starts as a copy of its "
                             "layer's dense FFN and the gates as initialised (see docs/learning_curves)")
    parser.add_argument("--moe-expert-parallel-size", type=int, metavar="P",
                        help="expert parallelism: each rank holds E / P experts of every MoE layer and tokens "
                             "reach them by all-to-all; P divides E and the world size (default 1: every rank "
                             "holds every expert)")
    parser.add_argument("--moe-add-langs", metavar="LANGS",
                        help="add languages to a trained model (docs/add-language.md): with --finetune-from-model "
                             "FULL.pt and --langs <its languages + LANGS appended>; every old parameter is frozen "
                             "(the old pairs' sub-networks stay bit-identical), only the new tasks' gate rows, "
                             "the new tags' embeddings and --moe-new-experts train")
    parser.add_argument("--moe-new-experts", type=int, metavar="N",
                        help="with --moe-add-langs: N new experts in every task-routed layer, which only the new "
                             "tasks' gate rows can select (default 0)")
    parser.add_argument("--moe-new-experts-init-from", metavar="LANG",
                        help="with --moe-add-langs: the new tasks start as LANG's (an old language): its gate rows, "
                             "its tag's embedding, new experts copied from the experts its task uses (default: "
                             "random, as a new model)")
    parser.add_argument("--moe-add-train-all", action="store_true",
                        help="with --moe-add-langs: train every parameter instead (the baseline of "
                             "docs/add-language.md; the old pairs change)")
    parser.add_argument("--moe-extracted-lang-pair", metavar="SRC-TGT",
                        help="set by taskmoe_fairseq.extract: the pair whose sub-network this is")
    parser.add_argument("--moe-merged-experts", action="store_true",
                        help="set by taskmoe_fairseq.extract --merge-experts")
    parser.add_argument("--moe-pruned-token-experts", type=int, metavar="K",
                        help="set by taskmoe_fairseq.extract --prune-token-experts: each token-routed layer keeps "
                             "K experts (K = 1: a dense FFN); the model approximates the full one")
    # fmt: on


def _default(args, name, value):
    # only an option that was not given takes the preset (0 is a value, checked later)
    if getattr(args, name, None) is None:
        setattr(args, name, value)


def set_moe_defaults(args, num_experts: int = 32):
    _default(args, "moe_expert_count", num_experts)
    _default(args, "moe_top_k", 2)
    for side, routing in (("encoder", "token"), ("decoder", "target")):
        _default(args, f"{side}_moe_freq", 2)
        _default(args, f"{side}_moe_routing", routing)
    _default(args, "moe_capacity_factor", 1.25)
    _default(args, "moe_eval_capacity_factor", 0.0)
    _default(args, "moe_second_expert_policy", "sampling")
    _default(args, "moe_task_gate_weights", "top-k")
    _default(args, "moe_task_gate_init", "random")
    _default(args, "moe_upcycle", False)
    _default(args, "moe_expert_parallel_size", 1)
    _default(args, "moe_extracted_lang_pair", None)
    _default(args, "moe_merged_experts", False)
    _default(args, "moe_pruned_token_experts", None)
    _default(args, "moe_add_langs", None)
    _default(args, "moe_new_experts", 0)
    _default(args, "moe_new_experts_init_from", None)
    _default(args, "moe_add_train_all", False)
    if isinstance(args.moe_add_langs, str):  # the command line's comma form, kept as a list
        args.moe_add_langs = [lang.strip() for lang in args.moe_add_langs.split(",") if lang.strip()] or None


def added_experts(cfg, side: str) -> int:
    """New experts (``--moe-new-experts``) in ``side``'s MoE layers: only layers with a learned task
    gate (source, target, pair routing) hold them; token, sentence and static layers keep E."""
    routing = getattr(cfg, f"{side}_moe_routing")
    if not getattr(cfg, "moe_add_langs", None) or routing_kinds.is_static(routing) or not routing_kinds.task_key(routing):
        return 0
    return int(getattr(cfg, "moe_new_experts", 0) or 0)


def is_moe_layer(cfg, side: str, index: int) -> bool:
    freq = getattr(cfg, f"{side}_moe_freq")
    return freq > 0 and (index + 1) % freq == 0


def num_layers(cfg, side: str) -> int:
    """Layers on ``side`` of a legacy namespace (``encoder_layers``) or a ``TransformerConfig``."""
    block = getattr(cfg, side, None)
    return block.layers if block is not None and hasattr(block, "layers") else getattr(cfg, f"{side}_layers")


def moe_layer_indices(cfg, side: str) -> List[int]:
    return [index for index in range(num_layers(cfg, side)) if is_moe_layer(cfg, side, index)]


def is_extracted(cfg, side: str) -> bool:
    """Whether ``side``'s MoE layers were reduced to one pair's experts by extraction."""
    return bool(getattr(cfg, "moe_extracted_lang_pair", None)) and routing_kinds.is_extractable(
        getattr(cfg, f"{side}_moe_routing")
    )


def pruned_token_experts(cfg, side: str):
    """K when ``side``'s token-routed MoE layers were pruned to K experts per layer
    (``extract --prune-token-experts K``), else None."""
    k = getattr(cfg, "moe_pruned_token_experts", None)
    return int(k) if k and getattr(cfg, f"{side}_moe_routing") == routing_kinds.TOKEN else None


def routed_layers(cfg, side: str) -> List[Tuple[int, str]]:
    """``(index, routing)`` of ``side``'s MoE layers whose decision the router takes
    (per-sentence routing, not extracted), in layer order."""
    routing = getattr(cfg, f"{side}_moe_routing")
    if not routing_kinds.is_per_sentence(routing) or is_extracted(cfg, side):
        return []
    return [(index, routing) for index in moe_layer_indices(cfg, side)]


def check_moe_args(args, num_langs: int):
    """Stop at start-up, with one line, on options that cannot work together."""
    if args.moe_expert_count < 1:
        raise usage_error(f"--moe-expert-count must be at least 1, got {args.moe_expert_count}")
    if not 1 <= args.moe_top_k <= args.moe_expert_count:
        raise usage_error(
            f"--moe-top-k {args.moe_top_k} must be between 1 and --moe-expert-count "
            f"({args.moe_expert_count}); lower --moe-top-k or add experts"
        )
    for side in SIDES:
        routing = getattr(args, f"{side}_moe_routing")
        if routing not in routing_kinds.ROUTING_CHOICES:
            raise usage_error(
                f"unknown --{side}-moe-routing '{routing}'; choose one of {', '.join(routing_kinds.ROUTING_CHOICES)}"
            )
        if getattr(args, f"{side}_moe_freq") < 0:
            raise usage_error(f"--{side}-moe-freq must be >= 0 (0 = no MoE layers)")
        if routing_kinds.task_key(routing) and getattr(args, f"{side}_moe_freq") > 0 and num_langs < 1:
            raise usage_error(
                f"--{side}-moe-routing {routing} routes by language, but the task gives no language "
                "list: train with --task multilingual_translation_taskmoe --langs ..."
            )
    check_expert_parallel_args(args)
    if getattr(args, "moe_upcycle", False):
        if all(getattr(args, f"{side}_moe_freq") == 0 for side in SIDES):
            raise usage_error("--moe-upcycle starts experts from a dense model, but this model has no MoE layers "
                              "(--encoder-moe-freq 0 --decoder-moe-freq 0); drop --moe-upcycle")
        if hasattr(args, "finetune_from_model") and not args.finetune_from_model:
            raise usage_error("--moe-upcycle needs --finetune-from-model DENSE.pt, the dense checkpoint whose "
                              "FFNs the experts start from")
    for option in UNSUPPORTED_OPTIONS:
        if getattr(args, option, False):
            raise usage_error(f"--{option.replace('_', '-')} is not supported by taskmoe_transformer; drop it")


def check_expert_parallel_args(args):
    """What expert parallelism cannot be combined with (one line each)."""
    size = getattr(args, "moe_expert_parallel_size", 1) or 1
    if size < 1:
        raise usage_error(f"--moe-expert-parallel-size must be at least 1, got {size}")
    if size == 1:
        return
    if args.moe_expert_count % size != 0:
        raise usage_error(
            f"--moe-expert-count {args.moe_expert_count} is not divisible by --moe-expert-parallel-size {size}: "
            f"each rank holds E / P experts; choose P among the divisors of {args.moe_expert_count}"
        )
    if getattr(args, "moe_extracted_lang_pair", None):
        raise usage_error("an extracted sub-network holds no expert shards; drop --moe-expert-parallel-size")
    for option in ("encoder_layerdrop", "decoder_layerdrop"):
        if (getattr(args, option, 0) or 0) > 0:
            raise usage_error(
                f"--{option.replace('_', '-')} with --moe-expert-parallel-size: ranks would skip different MoE "
                "layers and their all-to-alls would not pair up; drop one of them"
            )
    for option in ("fp16", "bf16", "memory_efficient_fp16", "memory_efficient_bf16"):
        if getattr(args, option, False):
            raise usage_error(
                f"--{option.replace('_', '-')} with --moe-expert-parallel-size: the expert-parallel gradient norm "
                "is computed over fp32 parameters only (fairseq's FP16 optimizers flatten them); train in fp32"
            )
    if getattr(args, "ddp_backend", None) == "fully_sharded":
        raise usage_error("--ddp-backend fully_sharded with --moe-expert-parallel-size is not supported; use legacy_ddp or pytorch_ddp")



def check_training_backend(args):
    """Refuse ``--ddp-backend fully_sharded`` for training (one line), before fairseq builds FSDP.

    fairseq's FSDP (fairscale's ``FullyShardedDataParallel``, ``flatten_parameters=True``)
    joins every parameter of a wrapped module into one flat buffer: ``--memory-efficient-fp16``
    halves that buffer, gates included, and ``--fp16`` (FSDP's mixed precision) computes from
    float16 copies of it, so :class:`~taskmoe_fairseq.modules.float32_params.Float32Params`
    cannot keep the gates float32 and full and extracted models would silently disagree.
    Called by the task's ``build_model`` for a new model only (a checkpoint being loaded for
    generation keeps loading whatever its training options were).

    Raises:
        TaskMoeError: ``args.ddp_backend == "fully_sharded"``.
    """
    if getattr(args, "ddp_backend", None) == "fully_sharded":
        raise usage_error(
            "--ddp-backend fully_sharded is not supported by taskmoe_transformer: FSDP flattens the gates into "
            "its half-precision parameter buffer, and gate math must stay float32; use --ddp-backend pytorch_ddp "
            "(the default) or legacy_ddp, with --fp16, --bf16 or --amp if you want half precision"
        )

def check_quant_noise(args):
    """Refuse ``--quant-noise-pq`` > 0 for training a model with MoE layers (one line).

    fairseq applies quantization noise (Fan et al., 2020) to a dense layer's ``fc1``/``fc2``
    through ``build_fc1``/``build_fc2``; an MoE layer has no ``fc1``/``fc2`` and its experts
    take no noise, so the option would act on the attention only: refused rather than silently
    half-applied. A dense model (``--encoder-moe-freq 0 --decoder-moe-freq 0``) is fairseq's
    transformer and keeps it. Called by the task's ``build_model`` for a new model only, as
    :func:`check_training_backend`: the noise acts only in training, so a checkpoint whose args
    carry the option still loads for generation.

    Raises:
        TaskMoeError: ``args.quant_noise_pq > 0`` and a side has MoE layers.
    """
    pq = getattr(args, "quant_noise_pq", 0) or 0
    has_moe_layers = any(
        (getattr(args, f"{side}_moe_freq", 0) or 0) > 0 and moe_layer_indices(args, side) for side in SIDES
    )  # (--arch transformer has no MoE options)
    if pq > 0 and has_moe_layers:
        raise usage_error(
            f"--quant-noise-pq {pq} is not supported with MoE layers (the experts have no fc1/fc2 to add noise to); "
            "drop --quant-noise-pq, or train a dense model (--encoder-moe-freq 0 --decoder-moe-freq 0)"
        )


def build_moe_ffn(cfg, side: str) -> nn.Module:
    """The FFN of an MoE layer on ``side``: experts (with a token gate for token routing),
    or, in a checkpoint written by extraction, the kept experts; a token-routed layer pruned to
    K experts (``moe_pruned_token_experts``) has K experts and a gate over them, or for K = 1
    one expert of weight 1."""
    routing = getattr(cfg, f"{side}_moe_routing")
    block = getattr(cfg, side)
    activation_dropout = cfg.activation_dropout or getattr(cfg, "relu_dropout", 0.0) or 0.0
    if is_extracted(cfg, side):
        k, width = (1, cfg.moe_top_k * block.ffn_embed_dim) if cfg.moe_merged_experts else (cfg.moe_top_k, block.ffn_embed_dim)
        return ExtractedFeedForward(block.embed_dim, width, k, cfg.activation_fn, activation_dropout)
    pruned = pruned_token_experts(cfg, side)
    if pruned == 1:  # one expert kept, gate weight 1: a dense FFN
        return ExtractedFeedForward(block.embed_dim, block.ffn_embed_dim, 1, cfg.activation_fn, activation_dropout)
    num_experts = pruned or cfg.moe_expert_count + added_experts(cfg, side)
    token_gate = None
    if routing == routing_kinds.TOKEN:
        token_gate = TokenTopKGate(
            block.embed_dim,
            num_experts,
            min(cfg.moe_top_k, num_experts),
            cfg.moe_capacity_factor,
            cfg.moe_eval_capacity_factor,
            cfg.moe_second_expert_policy,
        )
    parallel = expert_parallel.setup(getattr(cfg, "moe_expert_parallel_size", 1) or 1, cfg.moe_expert_count)
    return MoeFeedForward(
        block.embed_dim, block.ffn_embed_dim, num_experts, token_gate, cfg.activation_fn, activation_dropout,
        expert_parallel=parallel,
    )


def wrap_like_fairseq(layer: nn.Module, cfg) -> nn.Module:
    """Activation checkpointing and FSDP wrapping exactly as fairseq's
    ``TransformerEncoderBase.build_encoder_layer`` / ``TransformerDecoderBase.build_decoder_layer``
    apply them to their own layers (``--checkpoint-activations``, ``--offload-activations``,
    ``--min-params-to-wrap``)."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


def build_moe_layer(cfg, side: str, index: int, **layer_kwargs) -> nn.Module:
    """An MoE encoder or decoder layer, hooked to the forward scope and wrapped as fairseq wraps its own."""
    name = routing_kinds.layer_name(side, index)
    layer_class = MoeEncoderLayer if side == "encoder" else MoeDecoderLayer
    layer = attach_moe_hooks(layer_class(cfg, build_moe_ffn(cfg, side), name, **layer_kwargs))
    return wrap_like_fairseq(layer, cfg)


def namespace_summary(args: argparse.Namespace) -> str:
    return (
        f"E={args.moe_expert_count} k={args.moe_top_k} "
        f"encoder={args.encoder_moe_routing}/every {args.encoder_moe_freq} "
        f"decoder={args.decoder_moe_routing}/every {args.decoder_moe_freq}"
    )
