"""Extraction as an operation of the model: :meth:`TaskMoeTransformerModel.extract`.

For every task-routed or static MoE layer (Kudugunta et al., 2021, section 4:
"we can extract the sub-network for a task"), the router evaluates the layer's
gate once for the pair's task and the layer produces its extracted form
(:meth:`MoeFeedForward.extract`): only the k experts it selects, with their
gate weights frozen in. Token- and sentence-routed layers stay whole. The
result is a model of the same class whose args record the pair
(``moe_extracted_lang_pair``), so it loads as an ordinary fairseq checkpoint
and translates exactly as the full model does.

The steps are separate functions so that a server holding one model's shared
weights (``taskmoe_fairseq.serve``) assembles each pair's sub-network the same
way: :func:`pair_decisions` (the router's ``decide_pair``), :func:`extracted_args`,
:func:`replaced_prefixes` and :func:`assemble` (``share=True``: the new model's
tensors *are* the given ones, no copy).
"""

import copy
import types
from typing import Dict, List, Optional, Tuple

import torch

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models import adding
from taskmoe_fairseq.models.moe_options import SIDES, routed_layers
from taskmoe_fairseq.models.router import gate_key_prefix
from taskmoe_fairseq.modules import routing_kinds


def extractable_layers(args) -> List[Tuple[str, int, str]]:
    """``(side, layer index, routing)`` of every task-routed or static MoE layer."""
    return [
        (side, index, routing)
        for side in SIDES
        for index, routing in routed_layers(args, side)
        if routing_kinds.is_extractable(routing)
    ]


def extracted_args(args, lang_pair: str, merge: bool = False, pruned_token_experts: Optional[int] = None):
    """A copy of the full model's args recording the sub-network of ``lang_pair`` (and, when its
    token-routed layers were pruned to K experts, ``moe_pruned_token_experts = K``: the model
    approximates the full one)."""
    new_args = copy.deepcopy(args)
    new_args.moe_extracted_lang_pair = lang_pair
    new_args.moe_merged_experts = bool(merge)
    new_args.moe_pruned_token_experts = pruned_token_experts
    return new_args


def moe_prefix(side: str, index: int) -> str:
    """State-dict prefix of a layer's MoE FFN: ``"decoder.layers.1.moe."``."""
    return f"{side}.layers.{index}.moe."


def replaced_prefixes(layers) -> Tuple[str, ...]:
    """State-dict prefixes that extraction replaces: the extracted layers' experts and their gates."""
    out = []
    for side, index, _ in layers:
        out += [moe_prefix(side, index), gate_key_prefix(side, index)]
    return tuple(out)


def pair_decisions(router, layers, lang_pair: str) -> List[Tuple[str, int, str, torch.Tensor, torch.Tensor]]:
    """``(side, index, routing, experts [K], weights [K] float32)`` per extractable layer: the
    decisions the model's own router (``decide_pair``) takes for ``lang_pair``."""
    return [(side, index, routing, *router.decide_pair(side, index, lang_pair)) for side, index, routing in layers]


def inference_task(model_or_args, source_dictionary, target_dictionary):
    """The task fields ``build_model`` reads (the dictionaries' sizes, the languages)."""
    args = getattr(model_or_args, "args", model_or_args)
    return types.SimpleNamespace(
        source_dictionary=source_dictionary,
        target_dictionary=target_dictionary,
        langs=list(args.taskmoe_langs),
        provides_language_ids=True,
    )


def _fill_non_persistent_buffers(model):
    """Buffers a meta-built model has that no state dict holds: fairseq's sinusoidal
    positions (``SinusoidalPositionalEmbedding.weights``), recomputed as its ``__init__`` does."""
    from fairseq.modules.sinusoidal_positional_embedding import SinusoidalPositionalEmbedding

    for name, module in model.named_modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            if isinstance(module, SinusoidalPositionalEmbedding) and buffer_name == "weights":
                module.weights = SinusoidalPositionalEmbedding.get_embedding(
                    buffer.size(0), module.embedding_dim, module.padding_idx
                )
            else:
                raise RuntimeError(f"cannot assemble the model: buffer {name}.{buffer_name} is in no state dict")


def assemble(model_class, args, task, state: Dict[str, torch.Tensor], share: bool = False):
    """``model_class.build_model(args, task)`` loaded strictly with ``state``.

    ``share``: build on the meta device and take ``state``'s tensors themselves
    (``load_state_dict(assign=True)``): nothing is allocated or copied, so models assembled
    from one dict share every tensor (pass Parameters, e.g. ``state_dict(keep_vars=True)``,
    to share the Parameter objects too); ``state`` must be upgraded already
    (``model.upgrade_state_dict``), as a built model's ``state_dict()`` is."""
    if not share:
        model = model_class.build_model(args, task)
        model.load_state_dict(state, strict=True)
        return model
    with torch.device("meta"):
        model = model_class.build_model(args, task)
    # nn.Module's loader: fairseq's (BaseFairseqModel.load_state_dict) takes no ``assign``; ``state``
    # comes from a built model or a checkpoint already upgraded (``model.upgrade_state_dict``)
    torch.nn.Module.load_state_dict(model, state, strict=True, assign=True)
    _fill_non_persistent_buffers(model)
    return model


def truncated_dictionary(dictionary, drop: int):
    """A copy of a fairseq ``Dictionary`` without its last ``drop`` symbols (the added languages' tags)."""
    smaller = copy.deepcopy(dictionary)
    for symbol in smaller.symbols[len(smaller.symbols) - drop:]:
        del smaller.indices[symbol]
    smaller.symbols = smaller.symbols[: len(smaller.symbols) - drop]
    smaller.count = smaller.count[: len(smaller.count) - drop]
    return smaller


def extract_model(model, lang_pair: str, merge: bool = False, token_experts=None, token_rows=None):
    """See :meth:`TaskMoeTransformerModel.extract`; returns ``(model, report rows)``.

    ``token_experts`` (``{(side, index): kept expert ids}``, the same number K in every
    token-routed layer; :meth:`TaskMoeTransformerModel.prune_token_experts`): those layers keep
    only these experts (:func:`~taskmoe_fairseq.models.pruning.pruned_layer_state`) and the
    model records K; ``token_rows``: their report rows, by the same keys."""
    from taskmoe_fairseq.models.pruning import pruned_layer_state

    args = model.args
    if getattr(args, "moe_extracted_lang_pair", None):
        raise usage_error(f"already extracted for {args.moe_extracted_lang_pair}; extract from the full checkpoint")
    layers = extractable_layers(args)
    token_experts = dict(token_experts or {})
    if not layers and not token_experts:
        raise usage_error(
            f"nothing to strip: no MoE layer is task-routed or static (encoder/decoder routing "
            f"{args.encoder_moe_routing}/{args.decoder_moe_routing}, every token may use every expert)"
        )
    router = model.encoder.moe_router
    task = inference_task(args, model.encoder.dictionary, model.decoder.dictionary)

    state, rows = {}, []
    for side, index, routing, experts, weights in pair_decisions(router, layers, lang_pair):
        moe = getattr(model, side).layers[index].moe
        extracted = moe.extract(experts, weights, merge)
        prefix = moe_prefix(side, index)
        for key, tensor in extracted.state_dict().items():
            state[prefix + key] = tensor
        rows.append(
            {
                "layer": routing_kinds.layer_name(side, index),
                "routing": routing,
                "experts_before": len(moe.experts),
                "experts_kept": [int(e) for e in experts],
                "gate_weights": [round(float(w), 6) for w in weights],
                "params_before": sum(p.numel() for p in moe.parameters()) + router.gate_parameters(side, index),
                "params_after": sum(t.numel() for t in extracted.state_dict().values()),
            }
        )
    kept_counts = {len(kept) for kept in token_experts.values()}
    if len(kept_counts) > 1:
        raise ValueError(f"every token-routed layer must keep the same number of experts, got {sorted(kept_counts)}")
    for (side, index), kept in token_experts.items():
        moe = getattr(model, side).layers[index].moe
        pruned = pruned_layer_state(moe, kept)
        prefix = moe_prefix(side, index)
        for key, tensor in pruned.items():
            state[prefix + key] = tensor
        row = dict((token_rows or {}).get((side, index)) or {"layer": routing_kinds.layer_name(side, index),
                                                              "routing": routing_kinds.TOKEN,
                                                              "experts_before": args.moe_expert_count,
                                                              "experts_kept": list(kept)})
        row["params_before"] = sum(p.numel() for p in moe.parameters())
        row["params_after"] = sum(t.numel() for t in pruned.values())
        rows.append(row)
    replaced = replaced_prefixes(layers) + tuple(moe_prefix(side, index) for side, index in token_experts)
    for key, tensor in model.state_dict().items():
        if not key.startswith(replaced):
            state[key] = tensor
    pruned_k = kept_counts.pop() if kept_counts else None
    new_args = args
    old_pair = adding.old_pair_model_parts(args, lang_pair)
    if old_pair is not None:
        # an old pair of a model that languages were added to: its sub-network as it was before adding
        # (the old language list; the added tags' embedding rows, the last ones, left out)
        new_args, added_tags = old_pair
        for key in adding.EMBEDDING_KEYS:
            if key in state:
                state[key] = state[key][: state[key].size(0) - added_tags]
        dictionary = truncated_dictionary(model.encoder.dictionary, added_tags)
        task = inference_task(new_args, dictionary, dictionary if model.decoder.dictionary is model.encoder.dictionary
                              else truncated_dictionary(model.decoder.dictionary, added_tags))
    new_model = assemble(type(model), extracted_args(new_args, lang_pair, merge, pruned_k), task, state)
    return new_model.to(next(model.parameters()).device), rows
