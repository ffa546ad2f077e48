"""Worker functions for tests that start gloo ranks in-process (``torch.multiprocessing.spawn``
needs them importable by name)."""

import torch
import torch.distributed as dist

EMBED, FFN, EXPERTS, TOP_K = 16, 32, 4, 2


def build_layer(routing, expert_parallel=None):
    from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
    from taskmoe_fairseq.modules.token_gate import TokenTopKGate

    torch.manual_seed(7)
    gate = TokenTopKGate(EMBED, EXPERTS, TOP_K, capacity_factor=1.0, second_expert_policy="all") if routing == "token" else None
    return MoeFeedForward(EMBED, FFN, EXPERTS, gate, expert_parallel=expert_parallel)


def rank_inputs(rank):
    """Rank ``rank``'s batch: ``x`` [T, B, C] (requires grad), padding mask [B, T], a sentence
    decision [B, K] (for per-sentence routing) and the loss weights."""
    generator = torch.Generator().manual_seed(100 + rank)
    time, batch = 5 + rank, 3 + rank  # ranks hold different shapes, as in training
    x = torch.randn(time, batch, EMBED, generator=generator).requires_grad_()
    lengths = torch.randint(1, time + 1, (batch,), generator=generator)
    lengths[0] = time
    padding_mask = torch.arange(time)[None, :] >= lengths[:, None]
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(batch)])
    weight = torch.rand(batch, TOP_K, generator=generator).softmax(-1)
    probe = torch.randn(time, batch, EMBED, generator=generator)
    return x, padding_mask, index, weight, probe


def forward_backward(layer, rank, routing):
    """Output (non-pad positions) and grads of input and parameters for rank ``rank``'s batch."""
    x, padding_mask, index, weight, probe = rank_inputs(rank)
    if routing == "token":
        y, _ = layer(x, padding_mask)
    else:
        y, _ = layer(x, padding_mask, index, weight)
    keep = (~padding_mask).t()[:, :, None].float()
    (y * probe * keep).sum().backward()
    return (y * keep).detach(), (x.grad * keep).detach()


def exactness_worker(rank, world_size, init_file, routings, failures):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from taskmoe_fairseq.expert_parallel import dispatch as expert_parallel

        ep = expert_parallel.setup(world_size, EXPERTS)
        for routing in routings:
            check_routing(rank, world_size, ep, routing, failures)
    finally:
        dist.barrier()  # no rank tears the groups down while another still uses them
        dist.destroy_process_group()


def check_routing(rank, world_size, ep, routing, failures):
    parallel = build_layer(routing, ep)
    y, x_grad = forward_backward(parallel, rank, routing)
    # the reference: one process holding every expert, run on each rank's batch
    reference = build_layer(routing)
    reference_out = [forward_backward(reference, source, routing) for source in range(world_size)]
    local_range = ep.local_range(EXPERTS)
    checks = {
        "output": (y, reference_out[rank][0]),
        "input grad": (x_grad, reference_out[rank][1]),
    }
    for name, param in parallel.experts.named_parameters():
        # the local experts' gradients sum every rank's tokens (grads accumulated over both batches)
        reference_param = dict(reference.experts.named_parameters())[name]
        expected = reference_param.grad[local_range.start:local_range.stop] if reference_param.grad is not None else None
        checks[f"experts {local_range.start}..{local_range.stop - 1} {name} grad"] = (param.grad, expected)
        checks[f"experts {local_range.start}..{local_range.stop - 1} {name}"] = (
            param.detach(), reference_param.detach()[local_range.start:local_range.stop]
        )
    if routing == "token":
        # the gate is replicated: its gradient is this rank's (DDP averages it later)
        single = build_layer(routing)
        forward_backward(single, rank, routing)
        checks["gate grad"] = (parallel.gate.wg.weight.grad, single.gate.wg.weight.grad)
    for name, (got, want) in checks.items():
        if got is None or want is None:
            if not (got is None and want is None):
                failures.put(f"rank {rank} {routing} {name}: one gradient is None")
            continue
        difference = (got - want).abs().max().item()
        if difference > 1e-5:
            failures.put(f"rank {rank} {routing} {name}: max difference {difference:.3g}")
    failures.put(f"rank {rank} {routing} checked {len(checks)}")


def groups_worker(rank, world_size, size, init_file, reports):
    """This rank's expert-parallel groups and what ``reduce_expert_gradients`` does to
    rank-dependent expert gradients (one of them missing on rank 0), put on ``reports``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from taskmoe_fairseq.expert_parallel.training import clip_grad_norm, reduce_expert_gradients
        from taskmoe_fairseq.expert_parallel import dispatch as expert_parallel

        ep = expert_parallel.setup(size, EXPERTS)
        again = expert_parallel.setup(size, EXPERTS)  # a second MoE layer of the same model: the same groups
        layer = build_layer("token", ep)
        experts = list(layer.experts.parameters())
        for i, param in enumerate(experts):
            param.grad = None if (rank, i) == (0, 0) else torch.full_like(param, float((rank + 1) * (i + 1)))
        layer.gate.wg.weight.grad = torch.ones_like(layer.gate.wg.weight)  # not an expert: left alone
        with torch.profiler.profile() as profile:
            reduce_expert_gradients(layer, ep)
        expert_squares = sum(float(param.grad.double().pow(2).sum()) for param in experts if param.grad is not None)
        norm = float(clip_grad_norm(list(layer.parameters()), 0.0, ep))  # 0: measure only
        reports.put({
            "rank": rank,
            "expert_squares": expert_squares,
            "gate_squares": float(layer.gate.wg.weight.grad.double().pow(2).sum()),
            "norm": norm,
            "group": dist.get_process_group_ranks(ep.group),
            "group_is_default": ep.group is None or ep.group is dist.group.WORLD,
            "replica_group": None if ep.replica_group is None else dist.get_process_group_ranks(ep.replica_group),
            "replica_is_default": ep.replica_group is dist.group.WORLD,
            "same_groups_again": again.group is ep.group and again.replica_group is ep.replica_group,
            "all_reduces": sum(1 for event in profile.events() if event.name == "gloo:all_reduce"),
            "expert_grads": [None if param.grad is None else param.grad.unique().tolist() for param in experts],
            "gate_grad": layer.gate.wg.weight.grad.unique().tolist(),
        })
    finally:
        dist.barrier()  # no rank tears the groups down while another still uses them
        dist.destroy_process_group()
