"""How the router's decisions reach fairseq's layer loops and how the layers'
auxiliary outputs come back, without copying fairseq's encoder/decoder forward.

fairseq's ``TransformerEncoderBase.forward_scriptable`` and
``TransformerDecoderBase.extract_features_scriptable`` call every layer with
fixed arguments and keep only the outputs they know (LayerDrop, activation
checkpointing and FSDP wrapping stay fairseq's). The plugin's encoder and
decoder run those functions unchanged inside a :class:`MoeForwardScope`, the one
channel between a forward and its MoE layers: it holds this forward's routing
(layer name -> ``(expert_index, expert_weight, expert_sets)``: ``[B, K]`` each
and their :class:`ExpertSets`) and collects its :class:`MoeAux` list. Two hooks
registered once on every MoE layer connect the scope to the layer's explicit
forward (:mod:`taskmoe_fairseq.modules.moe_transformer_layer`):

* a forward pre-hook adds ``moe_expert_index`` / ``moe_expert_weight`` /
  ``moe_expert_sets`` to the layer's keyword arguments, so they are ordinary
  forward inputs (activation checkpointing saves and replays them; FSDP sees
  them as arguments);
* a forward hook takes the three aux tensors a token-routed layer returns after
  fairseq's outputs, records them in the scope, and hands fairseq's loop the
  output it expects.

Why hooks rather than the layer reading the scope itself: fairseq's
``checkpoint_wrapper`` replaces the layer's ``forward``, runs it first without
gradient and again in backward, outside the scope. Module hooks run around the
wrapped forward, inside the scope, exactly once per call: the routing goes in as
saved arguments and the aux comes out as the checkpointed function's outputs, so
the gate loss keeps its gradient.

A layer that LayerDrop skips is not called, so it reports nothing: no stale
value can be added twice. The scope is a context variable: concurrent forwards
in threads each see their own.
"""

import contextvars
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from taskmoe_fairseq.modules.moe_transformer_layer import AUX_OUTPUTS
from taskmoe_fairseq.modules.routing_decision import ExpertSets, MoeAux

_SCOPE: contextvars.ContextVar = contextvars.ContextVar("taskmoe_forward_scope", default=None)


class MoeForwardScope:
    """``with MoeForwardScope(routing) as scope: ...``; afterwards ``scope.aux`` lists
    the :class:`MoeAux` of every MoE layer that ran, in call order."""

    def __init__(self, routing: Optional[Dict[str, Tuple[Tensor, Tensor, ExpertSets]]] = None):
        self.routing = routing or {}
        self.aux: List[MoeAux] = []
        self._token = None

    def __enter__(self):
        self._token = _SCOPE.set(self)
        return self

    def __exit__(self, *exc):
        _SCOPE.reset(self._token)
        return False


def _inject_routing(layer, args, kwargs):
    scope = _SCOPE.get()
    decision = scope.routing.get(layer.moe_layer_name) if scope is not None else None
    if decision is None:
        return None
    kwargs = dict(kwargs, moe_expert_index=decision[0], moe_expert_weight=decision[1], moe_expert_sets=decision[2])
    return args, kwargs


def _collect_aux(layer, args, output):
    if not layer.moe.routes_tokens:
        return None
    gate_loss, load, dropped = output[-AUX_OUTPUTS:]
    scope = _SCOPE.get()
    if scope is not None:
        scope.aux.append(MoeAux(layer.moe_layer_name, gate_loss, load, dropped))
    rest = output[:-AUX_OUTPUTS]
    return rest[0] if len(rest) == 1 else rest


def attach_moe_hooks(layer):
    """Register the two hooks on an MoE layer (before fairseq wraps it); returns the layer."""
    layer.register_forward_pre_hook(_inject_routing, with_kwargs=True)
    layer.register_forward_hook(_collect_aux)
    return layer
