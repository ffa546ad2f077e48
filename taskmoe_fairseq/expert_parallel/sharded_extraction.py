"""Extraction straight from an expert-parallel checkpoint (``-shared.pt`` + ``-rank-N.pt``),
reading only the shards that hold the experts the requested pairs keep.

The shared file holds the gates (``encoder.moe_router.gates.*``), so the experts each
task-routed or static layer keeps for a pair are known before any shard is read
(the router's own :meth:`~taskmoe_fairseq.models.router.MoeRouter.decide_pair`). A
token- or sentence-routed MoE layer keeps every expert, so then every shard is read.
The model is built on the ``meta`` device and the read tensors are assigned to it; the
rows of unread shards in a layer's expert stack are left unset (untouched pages take no
memory, :func:`~taskmoe_fairseq.expert_parallel.sharded_checkpoint.consolidate`), and
extraction, which keeps only experts of the shards read, drops them.
"""

import copy
import os
from typing import List, Tuple

import torch

from taskmoe_fairseq.expert_parallel import sharded_checkpoint
from taskmoe_fairseq.models.moe_options import SIDES, moe_layer_indices
from taskmoe_fairseq.models.router import ROUTER_PREFIX, MoeRouter
from taskmoe_fairseq.modules import routing_kinds



def is_sharded(state: dict) -> bool:
    return isinstance(state, dict) and sharded_checkpoint.META in state


def needed_shards(state: dict, args, pairs: List[str], layers) -> List[int]:
    """Shards holding an expert some pair's sub-network keeps (every shard if a layer routes per token)."""
    meta = state[sharded_checkpoint.META]
    size, per_shard = int(meta["size"]), int(meta["num_experts"]) // int(meta["size"])
    whole = any(
        moe_layer_indices(args, side) and not routing_kinds.is_extractable(getattr(args, f"{side}_moe_routing"))
        for side in SIDES
    )
    if whole or not layers:
        return list(range(size))
    router = MoeRouter(args, args.encoder_embed_dim, list(args.taskmoe_langs))
    router.load_state_dict({k[len(ROUTER_PREFIX):]: v for k, v in state["model"].items() if k.startswith(ROUTER_PREFIX)})
    experts = set()
    for pair in pairs:
        for side, index, _ in layers:
            experts.update(int(e) for e in router.decide_pair(side, index, pair)[0])
    return sorted({expert // per_shard for expert in experts})


def read(path: str, state: dict, args, pairs: List[str], layers) -> Tuple[dict, List[int], int]:
    """``(checkpoint with the needed shards' experts, shards read, bytes of the whole set)``."""
    stem = sharded_checkpoint.stem_of(path)
    metas = sharded_checkpoint.check_set(stem)
    shards = needed_shards(state, args, pairs, layers)
    return sharded_checkpoint.consolidate(stem, shards), shards, sum(os.path.getsize(p) for p in metas)


def build_partial(model_class, args, task, model_state: dict):
    """The model with ``model_state`` assigned; parameters it lacks (experts a pre-stacking
    checkpoint held per expert) stay on ``meta``.

    Raises:
        KeyError: something other than an expert is missing (a corrupt set).
    """
    with torch.device("meta"):
        model = model_class.build_model(copy.deepcopy(args), task)
    model_state = dict(model_state)
    model.upgrade_state_dict(model_state)  # what fairseq's load_state_dict does first
    missing, unexpected = torch.nn.Module.load_state_dict(model, model_state, strict=False, assign=True)
    stray = [key for key in missing if ".moe.experts." not in key] + list(unexpected)
    if stray:
        raise KeyError(f"unexpected or missing parameters: {', '.join(stray[:5])}")
    return model.eval()
