"""Expert parallelism (``--moe-expert-parallel-size``): two gloo ranks each holding half the
experts give the outputs and gradients of one process holding all of them."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expert_parallel_workers import exactness_worker
from model_helpers import build_model
from taskmoe_fairseq.expert_parallel import consolidate, sharded_checkpoint
from taskmoe_fairseq.safe_loading import safe_torch_load
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.expert_parallel import dispatch as expert_parallel


@pytest.mark.slow
def test_two_ranks_match_one_process_forward_and_backward(tmp_path):
    """Token routing (GShard gate with capacity) and a per-sentence decision (task routing's
    path), E = 4 on P = 2 ranks with different batch shapes: outputs, input gradients, every
    expert's parameters and gradient (summed over both ranks' tokens by the all-to-all's
    backward) and the token gate's gradient within 1e-5 of the single-process layer."""
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(exactness_worker, args=(2, str(tmp_path / "rendezvous"), ("token", "sentence"), failures), nprocs=2)
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert len([m for m in messages if " checked " in m]) == 4, messages
    assert [m for m in messages if " checked " not in m] == []



def rank_reports(worker, world_size, *args, folder):
    reports = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(world_size, *args, str(folder / "rendezvous"), reports), nprocs=world_size)
    got = []
    while not reports.empty():
        got.append(reports.get())
    return sorted(got, key=lambda report: report["rank"])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_groups_are_their_own_and_expert_gradients_reduce_in_one_call(world_size, tmp_path):
    """P = 2 on 2 ranks and on 4 (two replicas per shard), gloo: the all-to-alls' group is never
    the default group (on NCCL it would share a communicator with everything else issued there),
    the replicas' group neither; the replicas sum the expert gradients in one all-reduce (was one
    per parameter), divided by W, a missing gradient counting as zeros; the gradient norm counts
    each expert of the group once."""
    from expert_parallel_workers import groups_worker

    reports = rank_reports(groups_worker, world_size, 2, folder=tmp_path)
    assert [report["rank"] for report in reports] == list(range(world_size))
    for report in reports:
        rank = report["rank"]
        start = rank - rank % 2
        assert report["group"] == [start, start + 1] and not report["group_is_default"], report
        assert report["same_groups_again"], report
        if world_size == 2:
            assert report["replica_group"] is None and report["all_reduces"] == 0, report
            replicas = [rank]
        else:
            replicas = [rank % 2, rank % 2 + 2]
            assert report["replica_group"] == replicas and not report["replica_is_default"], report
            assert report["all_reduces"] == 1, report
        want = [[sum(0 if (r, i) == (0, 0) else (r + 1) * (i + 1) for r in replicas) / world_size]
                for i in range(len(report["expert_grads"]))]
        if world_size == 2 and rank == 0:
            want[0] = None  # no replicas: a gradient no token made stays None (as DDP leaves it)
        assert report["expert_grads"] == want, report
        assert report["gate_grad"] == [1.0]
        # the clipping norm counts every expert of the group once, and the replicated gate
        group_squares = sum(reports[member]["expert_squares"] for member in report["group"])
        assert report["norm"] == pytest.approx((report["gate_squares"] + group_squares) ** 0.5, rel=1e-6)

# --- bad input: one line each (TaskMoeError) ---


@pytest.mark.parametrize("overrides, message", [
    ({"moe_expert_count": 4, "moe_expert_parallel_size": 3},
     "--moe-expert-count 4 is not divisible by --moe-expert-parallel-size 3"),
    ({"moe_expert_parallel_size": 2, "encoder_layerdrop": 0.2}, "--encoder-layerdrop with --moe-expert-parallel-size"),
    ({"moe_expert_parallel_size": 2, "fp16": True}, "--fp16 with --moe-expert-parallel-size"),
    ({"moe_expert_parallel_size": 2}, "this process is not distributed: train with torchrun (torchrun --nproc_per_node N"),
])
def test_model_options_that_cannot_work(overrides, message):
    with pytest.raises(TaskMoeError) as error:
        build_model(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_expert_parallel_size_must_divide_the_world_size(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(TaskMoeError, match="--moe-expert-parallel-size 2 does not divide the world size 1"):
            expert_parallel.setup(2, 4)
    finally:
        dist.destroy_process_group()


def write_set(folder, size=2, run="run-a", updates=5, name="checkpoint_last"):
    """A small expert-parallel set written the way the trainer writes one (split_state)."""
    stem = os.path.join(folder, name)
    for shard in range(size):
        state = {
            "cfg": {"model": None},
            "optimizer_history": [{"num_updates": updates}],
            "model": {"encoder.embed_tokens.weight": torch.ones(3, 2),
                      "encoder.layers.1.moe.experts.fc1_weight": torch.full((1, 2, 2), float(shard))},
            "last_optimizer_state": {"state": {0: {"step": 1}, 1: {"step": shard}}, "param_groups": []},
        }
        meta = {"size": size, "num_experts": size, "run": run, "num_updates": updates, "shard": shard}
        shared, shard_state = sharded_checkpoint.split_state(
            state, ["encoder.layers.1.moe.experts.fc1_weight"], [1], meta)
        sharded_checkpoint.save(shard_state, sharded_checkpoint.shard_path(stem, shard))
        if shard == 0:
            sharded_checkpoint.save(shared, sharded_checkpoint.shared_path(stem))
    return stem


def consolidate_error(folder, capsys, output):
    assert consolidate.main(["--checkpoint-dir", str(folder), "--output", str(output)]) == 2
    assert not os.path.exists(output)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_consolidation_joins_the_shards_under_global_names(tmp_path):
    stem = write_set(str(tmp_path), size=2)
    state = sharded_checkpoint.consolidate(stem)
    model = state["model"]
    # shard 1's local expert 0 is global expert 1 (E / P = 1 per shard): row 1 of the stack
    assert torch.equal(model["encoder.layers.1.moe.experts.fc1_weight"], torch.stack([torch.zeros(2, 2), torch.ones(2, 2)]))
    assert "last_optimizer_state" not in state and sharded_checkpoint.META not in state
    merged = sharded_checkpoint.merge_shard(
        safe_torch_load(sharded_checkpoint.shared_path(stem)), safe_torch_load(sharded_checkpoint.shard_path(stem, 1)))
    assert merged["last_optimizer_state"]["state"] == {0: {"step": 1}, 1: {"step": 1}}


def test_consolidating_an_incomplete_or_mixed_set_is_one_line(tmp_path, capsys):
    output = tmp_path / "full.pt"
    stem = write_set(str(tmp_path / "missing"))
    os.remove(sharded_checkpoint.shard_path(stem, 1))
    assert "checkpoint_last-rank-1.pt is missing: an expert-parallel checkpoint with P = 2" in consolidate_error(
        tmp_path / "missing", capsys, output)

    mixed = tmp_path / "mixed"
    stem = write_set(str(mixed), run="run-a")
    other = write_set(str(tmp_path / "other"), run="run-b")
    os.replace(sharded_checkpoint.shard_path(other, 1), sharded_checkpoint.shard_path(stem, 1))
    error = consolidate_error(mixed, capsys, output)
    assert "checkpoint_last-rank-1.pt does not belong with" in error and "its run is 'run-b'" in error

    stem = write_set(str(tmp_path / "noshared"))
    os.remove(sharded_checkpoint.shared_path(stem))
    assert "checkpoint_last-shared.pt is missing beside" in consolidate_error(tmp_path / "noshared", capsys, output)


def test_resuming_with_another_expert_parallel_size_is_refused(tmp_path):
    stem = write_set(str(tmp_path), size=2)
    with pytest.raises(TaskMoeError, match="saved with --moe-expert-parallel-size 2 but this run has 4"):
        sharded_checkpoint.check_set(stem, expected_size=4)


def shard_a_checkpoint(model, folder, size):
    """The files expert-parallel training with P = ``size`` writes, made from an in-process model,
    and the same model as one ordinary checkpoint (``full.pt``)."""
    args = model.args
    args.arch, args.lang_pairs = "taskmoe_transformer_tiny", "en-de,de-en,en-fr,fr-en"
    stem = os.path.join(folder, "checkpoint_last")
    sharded_checkpoint.save_sharded(model.state_dict(), args, stem, size, run="r")
    full = {"cfg": {"model": args}, "model": model.state_dict(), "optimizer_history": []}
    sharded_checkpoint.save(full, os.path.join(folder, "full.pt"))
    return stem


def test_extraction_reads_only_the_shards_holding_the_kept_experts(tmp_path, capsys):
    """target/target, E = 8 on P = 8 shards (one expert each): en-de keeps k = 2 experts per layer,
    so at most 4 shards are read; the result equals extraction from the full checkpoint."""
    from taskmoe_fairseq import extract

    model, _ = build_model("target", "target", moe_expert_count=8)
    stem = shard_a_checkpoint(model, str(tmp_path), 8)
    kept = {int(e) for side in ("encoder", "decoder") for e in model.encoder.moe_router.decide_pair(side, 1, "en-de")[0]}
    assert extract.main(["--checkpoint", sharded_checkpoint.shared_path(stem), "--lang-pair", "en-de",
                         "--output", str(tmp_path / "from_shards.pt")]) == 0
    assert f"read expert shards {sorted(kept)} of" in capsys.readouterr().err
    assert len(kept) < 8
    assert extract.main(["--checkpoint", str(tmp_path / "full.pt"), "--lang-pair", "en-de",
                         "--output", str(tmp_path / "from_full.pt")]) == 0
    a = safe_torch_load(str(tmp_path / "from_shards.pt"))["model"]
    b = safe_torch_load(str(tmp_path / "from_full.pt"))["model"]
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
