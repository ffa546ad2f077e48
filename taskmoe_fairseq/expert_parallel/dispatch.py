"""Expert parallelism: each rank of an expert-parallel group holds E / P experts of
every MoE layer, and the token rows meet their expert by all-to-all.

Layout (as in fairseq's MoE branch and GShard, with the group size an option):
the world of W ranks is cut into W / P expert-parallel groups of P consecutive
ranks (``[0, P)``, ``[P, 2P)``, ...); rank ``r`` holds the global experts
``[l * E/P, (l + 1) * E/P)`` with ``l = r % P``. The ranks that hold the same
experts (``l``, ``l + P``, ...) form that shard's expert-data-parallel group: its
gradients are summed there, not over the world.

Dispatch (:func:`run_experts`): the kept (row, expert) assignments arrive sorted by
global expert; one all-to-all of the per-expert counts, one of the rows (uneven
splits), each local expert runs once on everything it received, and a second
all-to-all sends the outputs back, in the order they left. Both exchanges are
differentiable (:class:`ExchangeRows`: the backward is the reverse exchange), so
a local expert's gradient sums the contributions of every rank's tokens.

Every rank calls both exchanges of every MoE layer in every forward and, in
training, their backward, whatever it routed (zero rows included), so the
collectives always pair up.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.errors import usage_error


@dataclass
class ExpertParallel:
    """Where this rank stands: ``size`` P, ``index`` l (its shard), ``world_size`` W, the
    expert-parallel ``group`` (P ranks; always a group of its own, never the default group,
    even when W == P) and the shard's ``replica_group`` (the W / P ranks holding the same
    experts, a group of its own; None when W == P: nothing to reduce)."""

    size: int
    index: int
    world_size: int
    group: Optional[object]
    replica_group: Optional[object]

    def local_range(self, num_experts: int) -> range:
        per_rank = num_experts // self.size
        return range(self.index * per_rank, (self.index + 1) * per_rank)


_GROUPS = {}  # (P, W) -> (the default group they were made under, group, replica group)


def setup(size: int, num_experts: int) -> Optional[ExpertParallel]:
    """This rank's :class:`ExpertParallel` for ``--moe-expert-parallel-size size`` (None for 1).

    Creates the process groups once per process (every rank calls this in the same order,
    as it builds the same model). The all-to-alls get a communicator of their own, never the
    default group's: on NCCL a communicator runs its collectives in order on one stream, so
    sharing it with the collectives other code issues on the default group (DDP's broadcasts,
    checkpoint and logging exchanges) would serialise them with, or hang them against, the
    dispatch (fairseq likewise makes its own ``new_group()`` for data parallelism rather than
    use ``group.WORLD``: "it seems to cause random NCCL hangs in some cases").

    Raises:
        TaskMoeError: P < 1, E not divisible by P, no process group, or P not dividing W.
    """
    if size is None or size == 1:
        return None
    if size < 1:
        raise usage_error(f"--moe-expert-parallel-size must be at least 1, got {size}")
    if num_experts % size != 0:
        raise usage_error(
            f"--moe-expert-count {num_experts} is not divisible by --moe-expert-parallel-size {size}: "
            f"each rank holds E / P experts; choose P among the divisors of {num_experts}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise usage_error(
            f"--moe-expert-parallel-size {size} needs {size} or a multiple of {size} ranks, but this process is not "
            "distributed: train with torchrun (torchrun --nproc_per_node N -m fairseq_cli.train ...); to run a saved "
            "expert-parallel model in one process, consolidate it first (python -m taskmoe_fairseq.consolidate)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size != 0:
        raise usage_error(
            f"--moe-expert-parallel-size {size} does not divide the world size {world}: run a multiple of {size} "
            f"ranks, or choose P among the divisors of {world}"
        )
    key = (size, world)
    if key not in _GROUPS or _GROUPS[key][0] is not dist.group.WORLD:  # new, or made before a re-initialisation
        group = replica_group = None
        for start in range(0, world, size):  # every rank creates every group, in the same order
            ranks = list(range(start, start + size))
            created = dist.new_group(ranks)
            if rank in ranks:
                group = created
        if world > size:
            for index in range(size):
                ranks = list(range(index, world, size))
                created = dist.new_group(ranks)
                if rank in ranks:
                    replica_group = created
        _GROUPS[key] = (dist.group.WORLD, group, replica_group)
    _, group, replica_group = _GROUPS[key]
    return ExpertParallel(size, rank % size, world, group, replica_group)


class ExchangeRows(torch.autograd.Function):
    """``all_to_all_single`` of rows with uneven splits, differentiable (the backward
    sends the gradients back the way the rows came). fairscale's ``_AllToAll`` only
    exchanges even splits; ``torch.distributed.nn.functional.all_to_all_single`` is
    deprecated in torch 2.13."""

    @staticmethod
    def forward(ctx, rows: Tensor, out_splits: List[int], in_splits: List[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = rows.new_empty((sum(out_splits),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return ExchangeRows.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def exchange_counts(counts: Tensor, ep: ExpertParallel) -> Tensor:
    """``counts``: LongTensor ``[E]`` rows this rank sends to each global expert; returns
    ``[P, E/P]``: rows each rank of the group sends to each of this rank's experts."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=ep.group)
    return received.view(ep.size, -1)


def run_experts(rows: Tensor, counts: List[int], experts: nn.Module, ep: ExpertParallel) -> Tensor:
    """Run rows on their experts across the expert-parallel group.

    Args:
        rows: ``[A, C]`` assignment rows sorted by global expert (``counts[e]`` rows for expert e).
        counts: ``E`` ints, rows per global expert on this rank.
        experts: this rank's E / P experts (global ids ``ep.local_range(E)``), a
            :class:`~taskmoe_fairseq.modules.expert_feed_forward.StackedExperts`: the rows received
            from every rank are computed together, as on one process.
    Returns:
        ``[A, C]``: each row's expert output, in the order of ``rows``.
    """
    size, per_rank = ep.size, len(experts)
    send = [sum(counts[r * per_rank:(r + 1) * per_rank]) for r in range(size)]
    # on the rows' device: NCCL exchanges only device tensors
    received_counts = exchange_counts(torch.tensor(counts, dtype=torch.long, device=rows.device), ep)  # [P, E/P]
    receive = received_counts.sum(dim=1).tolist()
    received = ExchangeRows.apply(rows, receive, send, ep.group)
    # received is source-rank-major; each local expert runs once on its rows from every source
    chunks = received.split(received_counts.reshape(-1).tolist())
    parts = [[chunks[source * per_rank + local] for source in range(size)] for local in range(per_rank)]
    inputs = torch.cat([part for local in parts for part in local])  # expert-major, as the stack wants
    local_counts = [sum(part.size(0) for part in local) for local in parts]
    # with no rows the (empty) received rows stay in the graph, so the return exchange's backward always runs
    result = experts(inputs, local_counts) if inputs.size(0) > 0 else inputs
    outputs = result.split([part.size(0) for local in parts for part in local])  # [local expert][source], flat
    back = torch.cat([outputs[local * size + source] for source in range(size) for local in range(per_rank)])
    return ExchangeRows.apply(back, send, receive, ep.group)


def mark_expert_parameters(module: nn.Module):
    """Tag ``module``'s parameters as expert parameters (``param.expert = True``, the attribute
    fairseq's ``LegacyDistributedDataParallel`` already skips): they differ per rank and are
    reduced only over their shard's replicas."""
    for param in module.parameters():
        param.expert = True
