"""A dense view of one TaskMoE sub-network, read from a checkpoint's state dict.

Which layers can become a dense Transformer layer (Kudugunta et al., 2021, section 4: a
task-routed layer uses the same k experts for every token of a task):

* a dense layer: fairseq's ``{side}.layers.{i}.fc1``/``fc2`` (width ``ffn``);
* a task-routed or static MoE layer after ``taskmoe_fairseq.extract``:
  ``{side}.layers.{i}.moe.experts.{0..k-1}`` with frozen ``moe.expert_weights`` ``[k]`` and no
  gate. ``y = sum_j w_j * expert_j(x)`` is one FFN of width ``k * ffn``: ``fc1`` rows stacked,
  ``fc2`` columns scaled by ``w_j`` and stacked, ``fc2`` biases summed with weights ``w_j``. A
  ``--merge-experts`` checkpoint already holds that FFN (``k = 1``, ``w = [1.0]``).

A layer that still has a gate (``moe.gate.*``: token or sentence routing) picks experts per
token or per sentence and has no dense equivalent. A token-routed layer pruned to one expert
(``extract --prune-token-experts 1``: ``moe_pruned_token_experts = 1``) is ``experts.0`` with
weight 1 and no gate, a dense FFN; the sub-network then only approximates the full model
(:func:`is_exact`).
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.modules.expert_feed_forward import merge_experts
from taskmoe_fairseq.modules.routing_kinds import SENTENCE, TOKEN, layer_name

SIDES = ("encoder", "decoder")
ROUTED_KINDS = (TOKEN, SENTENCE)  # routings whose experts depend on the tokens
IGNORED_SUFFIXES = (".version", "._float_tensor")
FFN_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@dataclass
class DenseLayer:
    """One layer of the dense view.

    ``ffn``: ``(fc1.weight [F, C], fc1.bias [F], fc2.weight [C, F], fc2.bias [C])``;
    ``origin``: ``"dense"`` or e.g. ``"2 target-routed experts merged"``."""

    name: str
    prefix: str
    ffn: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    origin: str


@dataclass
class SubNetwork:
    """The state dict, the fairseq model args (``argparse.Namespace``) and the dense layers."""

    state: Dict[str, torch.Tensor]
    args: object
    encoder_layers: List[DenseLayer] = field(default_factory=list)
    decoder_layers: List[DenseLayer] = field(default_factory=list)

    def args_flag(self, name: str) -> bool:
        return bool(getattr(self.args, name, False))

    @property
    def padding_idx(self) -> int:
        return int(getattr(self.args, "pad", 1))

    @property
    def activation_fn(self) -> str:
        return getattr(self.args, "activation_fn", "relu") or "relu"

    @property
    def encoder_heads(self) -> int:
        return int(self.args.encoder_attention_heads)

    @property
    def decoder_heads(self) -> int:
        return int(self.args.decoder_attention_heads)

    @property
    def encoder_pre_norm(self) -> bool:
        return self.args_flag("encoder_normalize_before")

    @property
    def decoder_pre_norm(self) -> bool:
        return self.args_flag("decoder_normalize_before")

    def max_positions(self, side: str) -> int:
        return int(getattr(self.args, "max_source_positions" if side == "encoder" else "max_target_positions", 1024))

    def has_final_norm(self, side: str) -> bool:
        return f"{side}.layer_norm.weight" in self.state

    def has_layernorm_embedding(self, side: str) -> bool:
        return f"{side}.layernorm_embedding.weight" in self.state


def layer_indices(state: Dict[str, torch.Tensor], side: str) -> List[int]:
    """Sorted indices ``i`` of the ``{side}.layers.{i}.*`` parameters present."""
    pattern = re.compile(rf"^{side}\.layers\.(\d+)\.")
    return sorted({int(m.group(1)) for m in map(pattern.match, state) if m})


def routing_of(args, side: str) -> str:
    return str(getattr(args, f"{side}_moe_routing", "") or "")


def moe_layer_names(state: Dict[str, torch.Tensor], side: str) -> List[str]:
    """``["encoder.1", ...]``: layers of ``side`` that hold an MoE FFN (``.moe.`` parameters)."""
    return [
        layer_name(side, index)
        for index in layer_indices(state, side)
        if any(key.startswith(f"{side}.layers.{index}.moe.") for key in state)
    ]


def pruned_to_dense(args, side: str) -> bool:
    """Whether ``side`` routes per token and its layers were pruned to one expert (a dense FFN)."""
    return routing_of(args, side) == TOKEN and int(getattr(args, "moe_pruned_token_experts", None) or 0) == 1


def is_exact(args) -> bool:
    """Whether the sub-network computes exactly what the full model does for its pair (no
    token-routed layer was pruned)."""
    return not getattr(args, "moe_pruned_token_experts", None)


def routed_layers(state: Dict[str, torch.Tensor], args) -> List[str]:
    """``["encoder.1 (token)", ...]``: MoE layers that route per token or sentence (no dense form).

    Works on full and extracted checkpoints: a side routed by ``token``/``sentence`` keeps its
    gate through extraction (task gates of a full checkpoint are removed by extraction)."""
    found = []
    for side in SIDES:
        routing = routing_of(args, side)
        if routing in ROUTED_KINDS and not pruned_to_dense(args, side):
            found += [f"{name} ({routing})" for name in moe_layer_names(state, side)]
    return found


def merged_ffn(state: Dict[str, torch.Tensor], prefix: str) -> Tuple[Tuple[torch.Tensor, ...], int]:
    """The one FFN ``(fc1.weight [kF, C], fc1.bias [kF], fc2.weight [C, kF], fc2.bias [C])``
    equal to ``sum_j w_j * expert_j`` for the k kept experts under ``prefix`` (``...moe.``),
    by :func:`~taskmoe_fairseq.modules.expert_feed_forward.merge_experts`."""
    weights = state[prefix + "expert_weights"]
    experts = []
    while f"{prefix}experts.{len(experts)}.fc1.weight" in state:
        experts.append({n: state[f"{prefix}experts.{len(experts)}.{n}"] for n in FFN_NAMES})
    if len(experts) != weights.numel():
        raise usage_error(f"{prefix[:-1]}: {len(experts)} experts but {weights.numel()} expert weights; re-extract the checkpoint")
    return merge_experts([tuple(e[n] for n in FFN_NAMES) for e in experts], weights), len(experts)


def dense_layer(state: Dict[str, torch.Tensor], args, side: str, index: int) -> Optional[DenseLayer]:
    """The dense form of layer ``index`` of ``side``, or None if it still has a gate."""
    prefix = f"{side}.layers.{index}"
    name = layer_name(side, index)
    if prefix + ".fc1.weight" in state:
        ffn = tuple(state[f"{prefix}.{n}"] for n in FFN_NAMES)
        return DenseLayer(name, prefix, ffn, "dense")
    moe = prefix + ".moe."
    if moe + "expert_weights" in state and not any(key.startswith(moe + "gate.") for key in state):
        ffn, kept = merged_ffn(state, moe)
        if pruned_to_dense(args, side):
            return DenseLayer(name, prefix, ffn, "token-routed MoE pruned to 1 expert (approximate)")
        top_k = int(getattr(args, "moe_top_k", kept) or kept)
        width = "merged" if kept == 1 else f"{kept} merged here"
        return DenseLayer(name, prefix, ffn, f"{routing_of(args, side)}-routed MoE, {top_k} kept experts ({width})")
    return None


def build_subnetwork(state: Dict[str, torch.Tensor], args, source: str) -> SubNetwork:
    """The dense view of ``state``; stops with one line naming every layer that has none."""
    routed = routed_layers(state, args)
    if routed:
        raise not_dense_error(source, routed)
    network = SubNetwork(state=state, args=args)
    for side in SIDES:
        expected = int(getattr(args, f"{side}_layers"))
        indices = layer_indices(state, side)
        if indices != list(range(expected)):
            raise usage_error(f"{source}: {side} has layers {indices} in its weights but --{side}-layers {expected}")
        layers = [dense_layer(state, args, side, index) for index in indices]
        missing = [layer_name(side, i) for i, layer in zip(indices, layers) if layer is None]
        if missing:
            raise not_dense_error(source, missing)
        setattr(network, f"{side}_layers", layers)
    return network


def not_dense_error(source: str, layers: List[str]):
    return usage_error(
        f"{source}: cannot export to a dense Transformer: {', '.join(layers)} "
        f"{'routes' if len(layers) == 1 else 'route'} per token or sentence, so the sub-network still needs "
        "every expert; export works when every MoE layer is task-routed or static "
        "(source, target, pair, static-*) or the side is dense (--encoder-moe-freq 0), or, approximately, "
        "with token-routed layers pruned to one expert (--prune-token-experts 1)"
    )
