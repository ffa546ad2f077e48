"""Per-pair pruning of token-routed MoE layers: :meth:`TaskMoeTransformerModel.prune_token_experts`.

A token-routed layer (GShard's top-k gate on each token) stays whole in an extracted
sub-network: any token may pick any expert. Pruning keeps, per token-routed layer, the K
experts a language pair's tokens use most, measured on a sample of the pair's own data, as
the NLLB-200 pruning study does per language (Koishekenov et al., 2023, arXiv 2212.09811,
"Memory-efficient NLLB-200: language-specific expert pruning"):

* ``load``: each expert's share of the top-k assignments of the pair's tokens (what the gate
  picks; assignments dropped over capacity are not counted);
* ``importance``: each expert's summed gate probability over the pair's tokens (Shazeer et
  al., 2017), as a share of the tokens.

The pruned layer's gate is the full gate restricted to the K kept experts (the K rows of its
``wg``) and renormalised over them: a softmax over the K kept logits, so among the kept
experts it chooses exactly as the full gate does; its top-k is ``min(k, K)``. K = 1 leaves
one expert of weight 1, a dense FFN (:class:`ExtractedFeedForward`). The kept experts stay
in their original order, so with K = E the pruned model *is* the full model, tensor for
tensor. Task-routed and static layers are extracted exactly as by :meth:`extract`. The
result approximates the full model; its args say so (``moe_pruned_token_experts = K``).
"""

from typing import Dict, Iterable, List, Tuple

import torch

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.moe_options import SIDES, moe_layer_indices
from taskmoe_fairseq.modules import routing_kinds

METRICS = ("load", "importance")

#: (side, layer index) -> kept expert ids, most used first
KeptExperts = Dict[Tuple[str, int], List[int]]


def token_routed_layers(args) -> List[Tuple[str, int]]:
    """``(side, index)`` of every token-routed MoE layer of a model that was not pruned yet."""
    if getattr(args, "moe_pruned_token_experts", None):
        return []
    return [
        (side, index)
        for side in SIDES
        if getattr(args, f"{side}_moe_routing") == routing_kinds.TOKEN
        for index in moe_layer_indices(args, side)
    ]


def check_prune_request(args, keep: int):
    """Raise one line unless ``keep`` experts can be kept in the token-routed layers of ``args``.

    Raises:
        TaskMoeError: K < 1, K > E, or no token-routed layer.
    """
    experts = int(args.moe_expert_count)
    if not 1 <= keep <= experts:
        raise usage_error(
            f"--prune-token-experts {keep} must be between 1 and the model's {experts} experts per layer "
            "(1: a dense FFN, E: the full layer)"
        )
    if not token_routed_layers(args):
        already = getattr(args, "moe_pruned_token_experts", None)
        raise usage_error(
            f"--prune-token-experts: this model's token-routed layers were already pruned to {already} experts; "
            "prune the full checkpoint"
            if already
            else f"--prune-token-experts: no MoE layer routes per token (encoder/decoder routing "
            f"{args.encoder_moe_routing}/{args.decoder_moe_routing}); task-routed layers are extracted exactly "
            "without it: drop the option"
        )


class ExpertUsage:
    """Counts, per token-routed layer, how the layer's gate routes the tokens of the batches run
    inside ``with ExpertUsage(model) as usage:`` (forward hooks on the layers' gates).

    ``load[layer]``: float64 ``[E]`` top-k assignments per expert; ``importance[layer]``: float64
    ``[E]`` summed gate probabilities; ``tokens[layer]``: non-pad tokens routed."""

    def __init__(self, model, layers: Iterable[Tuple[str, int]]):
        self.model = model
        self.layers = list(layers)
        self.load: Dict[str, torch.Tensor] = {}
        self.importance: Dict[str, torch.Tensor] = {}
        self.tokens: Dict[str, int] = {}
        self._handles = []

    def __enter__(self):
        for side, index in self.layers:
            gate = getattr(self.model, side).layers[index].moe.gate
            name = routing_kinds.layer_name(side, index)
            self.load[name] = torch.zeros(gate.num_experts, dtype=torch.float64)
            self.importance[name] = torch.zeros(gate.num_experts, dtype=torch.float64)
            self.tokens[name] = 0
            self._handles.append(gate.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def _hook(self, name):
        def record(gate, inputs, decision):
            tokens = inputs[0]
            probs = torch.nn.functional.linear(tokens.float(), gate.wg.weight.float()).softmax(dim=-1)
            self.importance[name] += probs.sum(dim=0).double().cpu()
            kept = decision.expert_weight > 0
            self.load[name] += torch.bincount(decision.expert_index[kept].reshape(-1), minlength=gate.num_experts).double().cpu()
            self.tokens[name] += tokens.size(0)

        return record

    def shares(self, name: str, metric: str) -> torch.Tensor:
        """float64 ``[E]``: each expert's share of the layer's top-k assignments (``load``) or of its
        tokens' summed gate probability (``importance``); sums to 1 (zeros before any token)."""
        counts = self.load[name] if metric == "load" else self.importance[name]
        return counts / counts.sum().clamp_min(1e-12)


def choose_experts(usage: ExpertUsage, metric: str, keep: int) -> KeptExperts:
    """The ``keep`` experts of each layer with the largest ``metric`` share, most used first
    (ties: the lower expert id first).

    Raises:
        TaskMoeError: no token of the sample reached a layer.
    """
    if metric not in METRICS:
        raise usage_error(f"--pruning-metric {metric}: choose one of {', '.join(METRICS)}")
    kept = {}
    for side, index in usage.layers:
        name = routing_kinds.layer_name(side, index)
        if usage.tokens[name] == 0:
            raise usage_error(f"the pruning sample has no token for layer {name}: pass more --pruning-sentences or other --pruning-data")
        shares = usage.shares(name, metric)
        order = sorted(range(shares.numel()), key=lambda e: (-float(shares[e]), e))
        kept[(side, index)] = order[:keep]
    return kept


def pruned_layer_state(moe, experts: List[int]) -> Dict[str, torch.Tensor]:
    """The state dict (keys relative to ``...moe.``) of a token-routed :class:`MoeFeedForward`
    keeping ``experts`` (ids; stored in ascending order): K > 1, the stacks' kept slices
    ``experts.fc1_weight [K, F, C]`` ... and the gate's kept rows ``gate.wg.weight`` ``[K, C]``;
    K = 1, ``experts.0.*`` and ``expert_weights = [1.0]`` (:class:`ExtractedFeedForward`'s layout)."""
    if moe.expert_parallel is not None:
        raise usage_error(
            "this layer holds only its rank's experts (expert parallelism): prune the consolidated checkpoint"
        )
    ids = sorted(int(e) for e in experts)
    state = {}
    if len(ids) == 1:
        for key, tensor in moe.experts.expert_module(ids[0]).state_dict().items():
            state[f"experts.0.{key}"] = tensor
        state["expert_weights"] = torch.ones(1)
    else:
        index = torch.tensor(ids, device=moe.experts.fc1_weight.device)
        for key, tensor in moe.experts.state_dict().items():
            state[f"experts.{key}"] = tensor.index_select(0, index)
        state["gate.wg.weight"] = moe.gate.wg.weight.detach()[ids].clone()
    return state


def usage_rows(usage: ExpertUsage, kept: KeptExperts, metric: str, experts_before: int) -> Dict[Tuple[str, int], dict]:
    """Report fields of each pruned layer: the kept experts (most used first), each one's share
    of the pair's top-k assignments and summed gate probability, and the kept share in all."""
    rows = {}
    for (side, index), ids in kept.items():
        name = routing_kinds.layer_name(side, index)
        load, importance = usage.shares(name, "load"), usage.shares(name, "importance")
        rows[(side, index)] = {
            "layer": name,
            "routing": routing_kinds.TOKEN,
            "experts_before": experts_before,
            "experts_kept": list(ids),
            "metric": metric,
            "token_share": [round(float(load[e]), 6) for e in ids],
            "probability_share": [round(float(importance[e]), 6) for e in ids],
            "kept_share": round(float(load[ids].sum()), 6),
            "kept_probability_share": round(float(importance[ids].sum()), 6),
            "tokens": usage.tokens[name],
        }
    return rows
