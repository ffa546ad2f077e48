"""The model's MoE options (named as in fairseq's MoE branch), their checks, and
the factory that builds a layer's FFN from them."""

import argparse

import torch.nn as nn

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.token_gate import SECOND_EXPERT_POLICIES

SIDES = ("encoder", "decoder")
UNSUPPORTED_DECODER_OPTIONS = ("cross_self_attention", "scale_attn", "scale_heads", "scale_fc", "scale_resids")


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
    parser.add_argument("--moe-extracted-lang-pair", metavar="SRC-TGT",
                        help="set by taskmoe_fairseq.extract: the pair whose sub-network this is")
    parser.add_argument("--moe-merged-experts", action="store_true",
                        help="set by taskmoe_fairseq.extract --merge-experts")
    # fmt: on


def set_moe_defaults(args, num_experts: int = 32):
    args.moe_expert_count = getattr(args, "moe_expert_count", None) or num_experts
    args.moe_top_k = getattr(args, "moe_top_k", None) or 2
    for side, routing in (("encoder", "token"), ("decoder", "target")):
        if getattr(args, f"{side}_moe_freq", None) is None:
            setattr(args, f"{side}_moe_freq", 2)
        setattr(args, f"{side}_moe_routing", getattr(args, f"{side}_moe_routing", None) or routing)
    if getattr(args, "moe_capacity_factor", None) is None:
        args.moe_capacity_factor = 1.25
    if getattr(args, "moe_eval_capacity_factor", None) is None:
        args.moe_eval_capacity_factor = 0.0
    args.moe_second_expert_policy = getattr(args, "moe_second_expert_policy", None) or "sampling"
    args.moe_extracted_lang_pair = getattr(args, "moe_extracted_lang_pair", None)
    args.moe_merged_experts = getattr(args, "moe_merged_experts", False)


def is_moe_layer(cfg, side: str, index: int) -> bool:
    freq = getattr(cfg, f"{side}_moe_freq")
    return freq > 0 and (index + 1) % freq == 0


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
    for option in UNSUPPORTED_DECODER_OPTIONS:
        if getattr(args, option, False):
            raise usage_error(f"--{option.replace('_', '-')} is not supported by taskmoe_transformer; drop it")


def build_moe_ffn(cfg, side: str) -> nn.Module:
    """The FFN of an MoE layer on ``side``: a routed :class:`MoeFeedForward`, or,
    in a checkpoint written by ``taskmoe_fairseq.extract``, the kept experts."""
    routing = getattr(cfg, f"{side}_moe_routing")
    block = getattr(cfg, side)
    activation_dropout = cfg.activation_dropout or getattr(cfg, "relu_dropout", 0.0) or 0.0
    if cfg.moe_extracted_lang_pair and routing_kinds.is_extractable(routing):
        if cfg.moe_merged_experts:
            return ExtractedFeedForward(
                block.embed_dim, cfg.moe_top_k * block.ffn_embed_dim, 1, cfg.activation_fn, activation_dropout
            )
        return ExtractedFeedForward(
            block.embed_dim, block.ffn_embed_dim, cfg.moe_top_k, cfg.activation_fn, activation_dropout
        )
    return MoeFeedForward(
        routing,
        block.embed_dim,
        block.ffn_embed_dim,
        cfg.moe_expert_count,
        cfg.moe_top_k,
        num_langs=len(cfg.taskmoe_langs or []),
        activation_fn=cfg.activation_fn,
        activation_dropout=activation_dropout,
        capacity_factor=cfg.moe_capacity_factor,
        eval_capacity_factor=cfg.moe_eval_capacity_factor,
        second_expert_policy=cfg.moe_second_expert_policy,
    )


def namespace_summary(args: argparse.Namespace) -> str:
    return (
        f"E={args.moe_expert_count} k={args.moe_top_k} "
        f"encoder={args.encoder_moe_routing}/every {args.encoder_moe_freq} "
        f"decoder={args.decoder_moe_routing}/every {args.decoder_moe_freq}"
    )
