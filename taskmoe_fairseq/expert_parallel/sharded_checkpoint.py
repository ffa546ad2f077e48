"""Checkpoints of expert-parallel training: one shared file plus one file per expert shard.

The layout of fairseq's MoE branch (``checkpoint_last-shared.pt`` beside
``checkpoint_last-rank-N.pt``):

* ``<name>-shared.pt`` (written by rank 0): an ordinary fairseq checkpoint (cfg,
  optimizer history, train iterator, metrics) whose ``model`` holds every parameter
  except the experts, and whose ``last_optimizer_state`` holds the optimizer state
  of those parameters (plus the parameter groups);
* ``<name>-rank-<l>.pt`` for ``l < P`` (written by rank ``l``, the first holder of
  shard ``l``): ``model``: shard ``l``'s expert parameters, each layer's local experts
  stacked (``decoder.layers.1.moe.experts.fc1_weight`` ``[E/P, F, C]``: row ``j`` is
  global expert ``l * E/P + j``; files written before experts were stacked hold
  ``decoder.layers.1.moe.experts.<j>.fc1.weight`` instead, and are read alike),
  ``optimizer_state``: their optimizer state (the same parameter indices on every rank,
  as every rank builds the same structure);
* both carry ``expert_parallel``: ``size`` P, ``num_experts`` E, ``run`` (one id
  per training run, kept across resumes), ``num_updates``, and ``shard`` l.

Files are written atomically (:func:`taskmoe_fairseq.files.atomic_write`).
:func:`consolidate` joins a complete set into one ordinary checkpoint (experts stacked
in global order, ``moe_expert_parallel_size`` 1, no optimizer state).
"""

import os
import re
from typing import Dict, List, Optional

import torch

from taskmoe_fairseq.safe_loading import safe_torch_load
from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.files import atomic_write

META = "expert_parallel"
SHARD_NAME = re.compile(r"^(?P<stem>.*)-rank-(?P<shard>\d+)\.pt$")
SHARED_NAME = re.compile(r"^(?P<stem>.*)-shared\.pt$")
EXPERT_KEY = re.compile(r"^(?P<layer>.*\.moe\.experts)\.(?P<index>\d+)\.(?P<rest>.*)$")  # one expert's (older files)
STACKED_KEY = re.compile(r"^(?P<layer>.*\.moe\.experts)\.(?P<name>fc[12]_(weight|bias))$")  # a layer's stack


def shard_path(stem: str, shard: int) -> str:
    return f"{stem}-rank-{shard}.pt"


def shared_path(stem: str) -> str:
    return f"{stem}-shared.pt"


def stem_of(path: str) -> Optional[str]:
    """``ckpt/checkpoint_last`` for ``ckpt/checkpoint_last-rank-1.pt`` or ``...-shared.pt``; else None."""
    match = SHARD_NAME.match(path) or SHARED_NAME.match(path)
    return match.group("stem") if match else None


def save(obj, path: str):
    atomic_write(path, lambda stream: torch.save(obj, stream))


def split_state(state: dict, expert_keys: List[str], expert_optimizer_ids: List[int], meta: dict):
    """A trainer ``state`` of one rank -> ``(shared, shard)`` as described above."""
    expert_keys = set(expert_keys)
    shared = {key: value for key, value in state.items() if key not in ("model", "last_optimizer_state")}
    shared["model"] = {key: value for key, value in state["model"].items() if key not in expert_keys}
    shard = {"model": {key: value for key, value in state["model"].items() if key in expert_keys}}
    optimizer = state.get("last_optimizer_state")
    if optimizer is not None:
        ids = set(expert_optimizer_ids)
        kept = {key: value for key, value in optimizer.items() if key != "state"}
        kept["state"] = {index: value for index, value in optimizer["state"].items() if index not in ids}
        shared["last_optimizer_state"] = kept
        shard["optimizer_state"] = {index: value for index, value in optimizer["state"].items() if index in ids}
    shared[META] = dict(meta)
    shard[META] = dict(meta)
    return shared, shard


def save_sharded(model_state: dict, args, stem: str, size: int, run: str = "sharded") -> None:
    """Write the files expert-parallel training with P = ``size`` writes (``stem``-shared.pt and
    ``stem``-rank-<l>.pt, layout above) from an ordinary model state dict, without optimizer
    state: what tests and benchmarks read sharded extraction from. ``args``: the model's
    Namespace (its ``moe_expert_count`` must be divisible by ``size``).

    Raises:
        TaskMoeError: E not divisible by ``size``.
    """
    import argparse

    num_experts = args.moe_expert_count
    if size < 1 or num_experts % size:
        raise usage_error(f"{num_experts} experts do not split into {size} shards")
    per_shard = num_experts // size
    meta = {"size": size, "num_experts": num_experts, "run": run, "num_updates": 0}
    shards: List[dict] = [{} for _ in range(size)]
    shared = {}
    for key, tensor in model_state.items():
        match = STACKED_KEY.match(key)
        if match is None:
            shared[key] = tensor
            continue
        for shard in range(size):
            shards[shard][key] = tensor[shard * per_shard:(shard + 1) * per_shard].clone()
    saved_args = argparse.Namespace(**{**vars(args), "moe_expert_parallel_size": size})
    save({"cfg": {"model": saved_args}, "model": shared, "optimizer_history": [], META: meta}, shared_path(stem))
    for shard, state in enumerate(shards):
        save({"model": state, META: {**meta, "shard": shard}}, shard_path(stem, shard))


def read_meta(path: str) -> dict:
    """The ``expert_parallel`` entry of a shared or shard file (memory-mapped read).

    Raises:
        TaskMoeError: unreadable file, or one without the entry.
    """
    state = safe_torch_load(path, mmap=True)
    meta = state.get(META) if isinstance(state, dict) else None
    if not isinstance(meta, dict):
        raise usage_error(f"{path}: not an expert-parallel checkpoint file (no '{META}' entry)")
    return meta


def check_set(stem: str, expected_size: Optional[int] = None) -> Dict[str, dict]:
    """Check that ``stem``'s shared file and its P shards exist and belong together.

    Returns ``{path: meta}`` (shared first). Raises TaskMoeError, one line: a file missing,
    a different P than ``expected_size`` (resuming), or shards of another run or update.
    """
    shared = shared_path(stem)
    if not os.path.isfile(shared):
        present = [path for path in (shard_path(stem, 0), shard_path(stem, 1)) if os.path.isfile(path)]
        if present:
            raise usage_error(
                f"{shared} is missing beside {present[0]}: the expert shards need the shared file of the same save"
            )
        raise usage_error(f"{shared}: no such file (expected the shared file of an expert-parallel checkpoint)")
    metas = {shared: read_meta(shared)}
    size = int(metas[shared]["size"])
    if expected_size is not None and size != expected_size:
        raise usage_error(
            f"{shared} was saved with --moe-expert-parallel-size {size} but this run has {expected_size}: resume "
            f"with {size}, or consolidate it (python -m taskmoe_fairseq.consolidate) and start a new run from "
            "the consolidated file with --finetune-from-model"
        )
    for shard in range(size):
        path = shard_path(stem, shard)
        if not os.path.isfile(path):
            raise usage_error(
                f"{path} is missing: an expert-parallel checkpoint with P = {size} has shards rank-0 .. rank-{size - 1}; "
                "copy every shard beside the shared file"
            )
        meta = read_meta(path)
        for key in ("run", "num_updates", "size"):
            if meta.get(key) != metas[shared].get(key):
                raise usage_error(
                    f"{path} does not belong with {shared}: its {key} is {meta.get(key)!r}, the shared file's "
                    f"{metas[shared].get(key)!r} (shards of another run or another save)"
                )
        if int(meta.get("shard", -1)) != shard:
            raise usage_error(f"{path} holds shard {meta.get('shard')!r}, not {shard}: the file was renamed")
        metas[path] = meta
    return metas


def merge_shard(state: dict, shard: dict) -> dict:
    """A rank's trainer state from the shared ``state`` (as fairseq's loader returns it) and its ``shard``."""
    state["model"] = dict(state["model"])
    state["model"].update(shard["model"])
    optimizer = state.get("last_optimizer_state")
    if optimizer is not None and "optimizer_state" in shard:
        optimizer["state"] = dict(optimizer["state"])
        optimizer["state"].update(shard["optimizer_state"])
    return state


def _set_arg(args, name, value):
    if isinstance(args, dict):
        args[name] = value
    else:
        setattr(args, name, value)


def _stack(pieces: Dict[int, torch.Tensor], num_experts: int) -> torch.Tensor:
    """``[E, ...]`` from row blocks ``{first expert: [n, ...]}``. Rows no block covers (shards
    not read) are left unset: ``torch.empty``, whose untouched pages take no memory; only
    extraction reads a subset of shards, and it keeps only experts of the shards it read."""
    starts = sorted(pieces)
    covered = sum(pieces[start].size(0) for start in starts)
    if covered == num_experts:
        return torch.cat([pieces[start] for start in starts])
    first = pieces[starts[0]]
    out = torch.empty((num_experts,) + tuple(first.shape[1:]), dtype=first.dtype)
    for start in starts:
        out[start:start + pieces[start].size(0)] = pieces[start]
    return out


def consolidate(stem: str, shards: Optional[List[int]] = None) -> dict:
    """One ordinary checkpoint from ``stem``'s shared file and its shards; each MoE layer's
    experts stacked in global order (``...moe.experts.fc1_weight [E, F, C]``), from shards of
    stacked or (written before experts were stacked) per-expert tensors.

    ``shards``: only these shards' experts (extraction of a pair that needs no others; the other
    shards' rows are unset, see :func:`_stack`); the default is every shard. Raises TaskMoeError
    on an incomplete or mixed set.
    """
    from taskmoe_fairseq.models.checkpoint_config import saved_options  # not at import: compat imports this module first
    # not at the top either: this module is read by commands that import fairseq only after quieting its logging
    from taskmoe_fairseq.modules.expert_feed_forward import stack_expert_state

    metas = check_set(stem)
    shared_meta = metas[shared_path(stem)]
    size, num_experts = int(shared_meta["size"]), int(shared_meta["num_experts"])
    per_shard = num_experts // size
    state = safe_torch_load(shared_path(stem), mmap=True)
    model = dict(state["model"])
    rows: Dict[str, Dict[int, torch.Tensor]] = {}  # stacked key -> {first global expert: rows}
    for shard in range(size) if shards is None else shards:
        experts = dict(safe_torch_load(shard_path(stem, shard), mmap=True)["model"])
        # a shard written before experts were stacked: its local experts 0..P-1 per layer, stacked as the model's
        # upgrade stacks them
        for layer in {match.group("layer") for match in map(EXPERT_KEY.match, list(experts)) if match is not None}:
            try:
                stack_expert_state(experts, f"{layer}.")
            except ValueError as error:
                raise usage_error(f"{shard_path(stem, shard)}: {error}") from None
        for key, tensor in experts.items():
            if STACKED_KEY.match(key) is None:
                raise usage_error(f"{shard_path(stem, shard)}: unexpected parameter {key} in an expert shard")
            rows.setdefault(key, {})[shard * per_shard] = tensor
    for key, pieces in rows.items():
        model[key] = _stack(pieces, num_experts)
    out = {key: value for key, value in state.items() if key not in ("model", "last_optimizer_state", META)}
    out["model"] = model
    args = saved_options(out)[0]
    if args is not None:
        _set_arg(args, "moe_expert_parallel_size", 1)
    return out
