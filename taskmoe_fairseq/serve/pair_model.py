"""One language pair's sub-network, assembled from the shared weights and that pair's experts.

The steps are the model's own extraction (:mod:`taskmoe_fairseq.models.extraction`): the
router's ``decide_pair`` picks each task-routed or static layer's k experts and gate weights,
:meth:`ExtractedFeedForward.from_experts` freezes them into the layer's serving form, and
:func:`~taskmoe_fairseq.models.extraction.assemble` builds the extracted model with
``share=True``: on the meta device, then every tensor *is* a shared one (the same Parameter
objects for every pair) except the kept experts. It computes what ``model.extract(pair)`` computes
and what ``fairseq-generate`` runs on the extracted checkpoint.

Pairs whose task ids are the same in every extracted layer (with target routing: de-en, fr-en
and ru-en) get one model: the :class:`ExpertSetKey` names the set, and the extracted model's
router accepts exactly those pairs.
"""

from typing import Dict, List, Tuple

import torch

from taskmoe_fairseq.models import extraction
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.expert_feed_forward import ExpertFeedForward
from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward

ExpertSetKey = Tuple[Tuple[str, int, int], ...]  # ((side, layer index, task id), ...) per extracted layer


def expert_set_key(weights, pair: str) -> ExpertSetKey:
    """The tasks ``pair`` has in the extracted layers (``()``: nothing to extract, one model)."""
    langs = list(weights.router.langs)
    return tuple(
        (side, index, routing_kinds.pair_task_ids(routing_kinds.task_key(routing), pair, langs))
        for side, index, routing in weights.layers
    )


def _expert(weights, tensors: Dict[Tuple[str, int, int], Tuple[torch.Tensor, ...]], side: str, index: int, expert: int) -> ExpertFeedForward:
    """The checkpoint's expert ``expert`` of a layer, as the model's module (no random init)."""
    args = weights.args
    fc1, fc1_bias, fc2, fc2_bias = tensors[(side, index, expert)]
    activation_dropout = getattr(args, "activation_dropout", 0.0) or getattr(args, "relu_dropout", 0.0) or 0.0
    with torch.device("meta"):
        module = ExpertFeedForward(fc1.size(1), fc1.size(0), args.activation_fn, activation_dropout)
    torch.nn.Module.load_state_dict(
        module, {"fc1.weight": fc1, "fc1.bias": fc1_bias, "fc2.weight": fc2, "fc2.bias": fc2_bias}, strict=True, assign=True
    )
    return module


def experts_state(weights, pair: str) -> Tuple[Dict[str, torch.Tensor], List[dict]]:
    """The extracted layers' state for ``pair`` (kept experts, frozen gate weights), read lazily
    from the checkpoint, and one row per layer (layer, experts kept, gate weights)."""
    decisions = extraction.pair_decisions(weights.router, weights.layers, pair)
    tensors = weights.read_experts([(side, index, e) for side, index, _, experts, _ in decisions for e in experts.tolist()])
    state, rows = {}, []
    for side, index, routing, experts, gate_weights in decisions:
        kept = [_expert(weights, tensors, side, index, e) for e in experts.tolist()]
        layer = ExtractedFeedForward.from_experts(kept, gate_weights, merge=False)
        for key, tensor in layer.state_dict().items():
            state[extraction.moe_prefix(side, index) + key] = tensor
        rows.append({"layer": routing_kinds.layer_name(side, index), "routing": routing,
                     "experts": [int(e) for e in experts], "gate_weights": [float(w) for w in gate_weights]})
    return state, rows


def build_pair_model(weights, pair: str):
    """The sub-network serving ``pair`` (and every pair with its :func:`expert_set_key`), in eval mode.

    Returns ``(model, rows)``; the model shares every non-expert tensor with ``weights.shared``.
    Raises:
        CheckpointChanged: the checkpoint changed on disk (:meth:`SharedWeights.read_experts`).
        TaskMoeError: the pair has no sub-network.
    """
    if weights.layers:
        args = extraction.extracted_args(weights.args, pair)
        state, rows = experts_state(weights, pair)
    else:  # an extracted checkpoint, or no task-routed layer: the whole model serves
        args, state, rows = weights.args, {}, []
    state.update(weights.shared)
    task = extraction.inference_task(args, weights.task.source_dictionary, weights.task.target_dictionary)
    model = extraction.assemble(weights.model_class, args, task, state, share=True)
    return model.eval(), rows
