"""Where the time of a step goes: gate, dispatch and experts, from one torch.profiler run.

``instrument`` wraps, on the model instance only (nothing in the package changes), every
MoE FFN in a ``moe.layer`` scope, its token gate in ``moe.gate``, the router's per-sentence
gates (evaluated once per forward, in the encoder) in ``moe.router``, each expert in
``moe.expert``; in a dense model, fc1 and fc2 of the layers at the MoE positions in
``ffn.dense``. ``attribute_profile`` turns a profile into milliseconds per category.
"""

import argparse
from typing import List

import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

from taskmoe_fairseq.models.moe_options import is_moe_layer
from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward

SCOPES = ("moe.gate", "moe.router", "moe.expert", "moe.layer", "ffn.dense")
CATEGORY = {"moe.gate": "gate", "moe.router": "gate", "moe.expert": "experts", "moe.layer": "dispatch", "ffn.dense": "experts"}


def instrument(model: nn.Module, shape: dict):
    """Wrap the model's MoE parts in profiler scopes; returns an undo function."""
    wrapped = []

    def wrap(module, name, method="forward"):
        original = getattr(module, method)

        def forward(*args, **kwargs):
            with record_function(name):
                return original(*args, **kwargs)

        setattr(module, method, forward)
        wrapped.append((module, method))

    for module in model.modules():
        if isinstance(module, (MoeFeedForward, ExtractedFeedForward)):
            wrap(module, "moe.layer")
            if module.routes_tokens:
                wrap(module.gate, "moe.gate")
            if isinstance(module.experts, nn.ModuleList):  # an extracted layer's expert modules
                for expert in module.experts:
                    wrap(expert, "moe.expert")
            else:  # a full layer's stack: each expert's FFN (loop, per-sentence path) and the padded bmm
                wrap(module.experts, "moe.expert", "_run_ffn")
                wrap(module.experts, "moe.expert", "padded_bmm")
    for gate in model.encoder.moe_router.gates.values():
        wrap(gate, "moe.router")
    probe = argparse.Namespace(encoder_moe_freq=shape["moe_freq"], decoder_moe_freq=shape["moe_freq"])
    for side in ("encoder", "decoder"):
        for index, layer in enumerate(getattr(model, side).layers):
            if is_moe_layer(probe, side, index) and getattr(layer, "moe", None) is None:
                wrap(layer.fc1, "ffn.dense")
                wrap(layer.fc2, "ffn.dense")

    def undo():
        for module, method in wrapped:
            delattr(module, method)

    return undo


def _scope_of(event):
    node = event
    while node is not None:
        if node.name in SCOPES:
            return node.name
        node = node.cpu_parent
    return None


def attribute_profile(prof, total_scope: str) -> dict:
    """Milliseconds per category of one profiled run.

    Forward: ``gate`` = token gates + router gates, ``experts`` = expert FFNs (dense: fc1 +
    fc2 at the MoE positions), ``dispatch`` = the rest of the MoE layers (grouping,
    index_select / index_add, weighting and summing). Backward: each
    ``autograd::engine::evaluate_function`` node carries the sequence number of the forward
    op that created it and is charged to that op's scope. ``total`` = the ``total_scope``
    record (profiler overhead inflates many-small-op code such as dispatch a little).
    """
    events = prof.events()
    sums = {name: 0.0 for name in SCOPES}
    total = 0.0
    seq_scope = {}
    for event in events:
        if event.name == total_scope:
            total += event.cpu_time_total / 1e3
        elif event.name in sums:
            sums[event.name] += event.cpu_time_total / 1e3
        elif getattr(event, "sequence_nr", -1) >= 0 and not event.name.startswith("autograd::engine"):
            scope = _scope_of(event)
            if scope is not None:
                seq_scope.setdefault(event.sequence_nr, scope)
    forward = {
        "gate": sums["moe.gate"] + sums["moe.router"],
        "experts": sums["moe.expert"] + sums["ffn.dense"],
        "dispatch": sums["moe.layer"] - sums["moe.gate"] - sums["moe.expert"],
    }
    backward = {"gate": 0.0, "dispatch": 0.0, "experts": 0.0}
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function") and _scope_of(event) is None:
            scope = seq_scope.get(getattr(event, "sequence_nr", -1))
            if scope is not None:
                backward[CATEGORY[scope]] += event.cpu_time_total / 1e3
    out = {key: forward[key] + backward[key] for key in forward}
    out.update(total=total, forward=forward, backward_attributed=backward)
    return out


def top_ops(prof, limit: int = 5) -> List[dict]:
    rows = []
    for entry in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True):
        if entry.key in SCOPES or entry.key.startswith(("decode.", "train.", "EnsembleModel", "SequenceGenerator")):
            continue
        rows.append({"op": entry.key, "self_ms": entry.self_cpu_time_total / 1e3, "calls": entry.count})
        if len(rows) == limit:
            break
    return rows


def profiled(model: nn.Module, shape: dict, run, total_scope: str, runs: int = 1) -> dict:
    """Profile ``run()`` under ``total_scope`` ``runs`` times; keep the least disturbed run."""
    undo = instrument(model, shape)
    best = None
    try:
        for _ in range(runs):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function(total_scope):
                    run()
            attributed = attribute_profile(prof, total_scope)
            if best is None or attributed["total"] < best["total"]:
                attributed["top_ops"] = top_ops(prof)
                best = attributed
            del prof
    finally:
        undo()
    return best
