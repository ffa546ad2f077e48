"""Extraction as an operation of the model: :meth:`TaskMoeTransformerModel.extract`.

For every task-routed or static MoE layer (Kudugunta et al., 2021, section 4:
"we can extract the sub-network for a task"), the router evaluates the layer's
gate once for the pair's task and the layer produces its extracted form
(:meth:`MoeFeedForward.extract`): only the k experts it selects, with their
gate weights frozen in. Token- and sentence-routed layers stay whole. The
result is a model of the same class whose args record the pair
(``moe_extracted_lang_pair``), so it loads as an ordinary fairseq checkpoint
and translates exactly as the full model does.
"""

import copy
import types
from typing import List, Tuple

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.moe_options import SIDES, routed_layers
from taskmoe_fairseq.modules import routing_kinds


def extractable_layers(args) -> List[Tuple[str, int, str]]:
    """``(side, layer index, routing)`` of every task-routed or static MoE layer."""
    return [
        (side, index, routing)
        for side in SIDES
        for index, routing in routed_layers(args, side)
        if routing_kinds.is_extractable(routing)
    ]


def extract_model(model, lang_pair: str, merge: bool = False):
    """See :meth:`TaskMoeTransformerModel.extract`; returns ``(model, report rows)``."""
    args = model.args
    if getattr(args, "moe_extracted_lang_pair", None):
        raise usage_error(f"already extracted for {args.moe_extracted_lang_pair}; extract from the full checkpoint")
    layers = extractable_layers(args)
    if not layers:
        raise usage_error(
            f"nothing to strip: no MoE layer is task-routed or static (encoder/decoder routing "
            f"{args.encoder_moe_routing}/{args.decoder_moe_routing}, every token may use every expert)"
        )
    router = model.encoder.moe_router
    new_args = copy.deepcopy(args)
    new_args.moe_extracted_lang_pair = lang_pair
    new_args.moe_merged_experts = bool(merge)
    task = types.SimpleNamespace(
        source_dictionary=model.encoder.dictionary,
        target_dictionary=model.decoder.dictionary,
        langs=list(args.taskmoe_langs),
        provides_language_ids=True,
    )

    state, rows, replaced = {}, [], []
    for side, index, routing in layers:
        experts, weights = router.decide_pair(side, index, lang_pair)
        moe = getattr(model, side).layers[index].moe
        extracted = moe.extract(experts, weights, merge)
        prefix = f"{side}.layers.{index}.moe."
        replaced += [prefix, f"encoder.moe_router.gates.{side}_{index}."]
        for key, tensor in extracted.state_dict().items():
            state[prefix + key] = tensor
        rows.append(
            {
                "layer": routing_kinds.layer_name(side, index),
                "routing": routing,
                "experts_before": args.moe_expert_count,
                "experts_kept": [int(e) for e in experts],
                "gate_weights": [round(float(w), 6) for w in weights],
                "params_before": sum(p.numel() for p in moe.parameters()) + router.gate_parameters(side, index),
                "params_after": sum(t.numel() for t in extracted.state_dict().values()),
            }
        )
    for key, tensor in model.state_dict().items():
        if not key.startswith(tuple(replaced)):
            state[key] = tensor
    new_model = type(model).build_model(new_args, task)
    new_model.load_state_dict(state, strict=True)
    return new_model.to(next(model.parameters()).device), rows
