"""Experts stored as stacked weights (``StackedExperts``) and computed together: the batched
forms equal the per-expert loop (forward and gradients), initialisation equals separate
modules', and state dicts and checkpoints written before the stacking (one module per
expert: ``...moe.experts.{e}.fc1.weight``) load and give the same outputs and hypotheses."""

import os

import pytest
import torch

from cli_helpers import generate_command, parse_generation, run_in_process
from model_helpers import build_model, random_batch
from taskmoe_fairseq.expert_parallel import sharded_checkpoint
from taskmoe_fairseq.modules.expert_feed_forward import (
    EXPERT_NAMES,
    STACKED_NAMES,
    ExpertFeedForward,
    StackedExperts,
    ffn_tensors,
    stack_expert_state,
)
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.token_gate import TokenTopKGate
from taskmoe_fairseq.safe_loading import safe_torch_load

C, F = 8, 16


def per_expert_layout(state: dict) -> dict:
    """``state`` as main wrote it before the stacking: each stacked ``...experts.fc1_weight
    [E, F, C]`` as E tensors ``...experts.{e}.fc1.weight`` (nn.Linear's names)."""
    out = {}
    for key, tensor in state.items():
        layer, _, name = key.rpartition(".")
        if layer.endswith(".experts") and name in STACKED_NAMES:
            for e in range(tensor.size(0)):
                out[f"{layer}.{e}.{EXPERT_NAMES[STACKED_NAMES.index(name)]}"] = tensor[e].clone()
        else:
            out[key] = tensor
    return out


def sorted_rows(counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), C, generator=generator, requires_grad=True)


COUNTS = {
    "balanced": [5, 5, 5, 5],
    "uneven": [9, 1, 0, 3],
    "one expert": [0, 7, 0, 0],
    "many experts few rows": [1, 0, 2, 0, 1, 1, 0, 0, 3, 0, 0, 1, 0, 0, 0, 1],
}


@pytest.mark.parametrize("case", COUNTS)
def test_padded_bmm_equals_the_loop_over_experts_forward_and_gradients(case):
    counts = COUNTS[case]
    torch.manual_seed(0)
    stacked = StackedExperts.initialised(C, F, len(counts))
    results = {}
    for mode in ("bmm", "loop"):
        rows = sorted_rows(counts)
        stacked.zero_grad()
        out = stacked(rows, counts, compute=mode)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[mode] = (out.detach(), rows.grad, [p.grad.clone() for p in stacked.stacked()])
    torch.testing.assert_close(results["bmm"][0], results["loop"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["bmm"][1], results["loop"][1], rtol=1e-5, atol=1e-6)
    for got, want in zip(results["bmm"][2], results["loop"][2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    unused = [e for e, count in enumerate(counts) if count == 0]
    assert all(float(grad[unused].abs().sum()) == 0 for grad in results["bmm"][2])


def test_loop_over_experts_is_the_separate_modules_computation_bit_for_bit():
    counts = COUNTS["uneven"]
    torch.manual_seed(0)
    stacked = StackedExperts.initialised(C, F, len(counts))
    modules = [stacked.expert_module(e) for e in range(len(counts))]
    rows = sorted_rows(counts)
    want = torch.cat([modules[e](chunk) for e, chunk in enumerate(rows.split(counts)) if counts[e]])
    assert torch.equal(stacked(rows, counts, compute="loop"), want)


def test_auto_compute_loops_on_the_cpu_and_takes_bmm_elsewhere_unless_padding_dominates():
    torch.manual_seed(0)
    stacked = StackedExperts.initialised(C, F, 16)
    assert stacked.choose_compute([5] * 16) == "loop"  # the CPU: the loop was never slower
    assert stacked.choose_compute([5] * 16, "cuda") == "bmm"
    assert stacked.choose_compute([3, 0] * 8, "cuda") == "bmm"  # padding 2x
    assert stacked.choose_compute([0, 7] + [0] * 14, "cuda") == "loop"  # one expert: one GEMM pair
    assert stacked.choose_compute([40] + [1] * 15, "cuda") == "loop"  # 16 x 40 padded rows for 55
    rows = sorted_rows([5] * 16)
    assert torch.equal(stacked(rows, [5] * 16), stacked(rows, [5] * 16, compute="loop"))
    with pytest.raises(ValueError, match="compute 'grouped': choose one of auto, bmm, loop"):
        stacked(torch.zeros(1, C), [1] + [0] * 15, compute="grouped")
    with pytest.raises(ValueError, match="counts has 2 entries for 16 experts"):
        stacked(torch.zeros(1, C), [1, 0])


@pytest.mark.parametrize("keep", [range(4), range(2, 4)])
def test_initialisation_equals_separate_modules_whatever_the_shard(keep):
    torch.manual_seed(3)
    modules = [ExpertFeedForward(C, F) for _ in range(4)]
    torch.manual_seed(3)
    stacked = StackedExperts.initialised(C, F, 4, keep)
    assert len(stacked) == len(keep)
    for local, e in enumerate(keep):
        for got, want in zip(stacked.ffn(local), ffn_tensors(modules[e])):
            assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["bmm", "loop"])
def test_token_routed_layer_matches_separate_expert_modules_forward_and_gradients(mode):
    """Training mode (capacity, drops): the stacked layer's output and its experts' gradients
    equal those of separate modules running the gate's decision."""
    torch.manual_seed(0)
    layer = MoeFeedForward(C, F, 4, TokenTopKGate(C, 4, 2, capacity_factor=0.8)).train()
    layer.experts.compute = mode
    x = torch.randn(6, 3, C)
    out, decision = layer(x, None)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    modules = [layer.experts.expert_module(e).requires_grad_(True) for e in range(4)]
    tokens = x.reshape(-1, C)
    want = torch.zeros_like(tokens)
    for row in range(tokens.size(0)):
        for weight, expert in zip(decision.expert_weight[row].detach(), decision.expert_index[row]):
            if weight > 0:
                want[row] = want[row] + weight * modules[int(expert)](tokens[row])
    torch.testing.assert_close(out.detach().reshape(-1, C), want.detach(), rtol=1e-5, atol=1e-6)
    (want.view_as(out) * weights).sum().backward()
    for e, module in enumerate(modules):
        for stacked, name in zip(layer.experts.stacked(), EXPERT_NAMES):
            expected = dict(module.named_parameters())[name].grad
            expected = torch.zeros_like(stacked[e]) if expected is None else expected
            torch.testing.assert_close(stacked.grad[e], expected, rtol=1e-5, atol=1e-6)


def test_sentence_routed_layer_gradients_equal_separate_expert_modules():
    torch.manual_seed(0)
    layer = MoeFeedForward(C, F, 6).train()
    x = torch.randn(5, 4, C)
    index = torch.tensor([[0, 3], [2, 1], [0, 3], [5, 4]])
    weight = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1]])
    out, _ = layer(x, None, index, weight)
    out.pow(2).sum().backward()
    modules = [layer.experts.expert_module(e).requires_grad_(True) for e in range(6)]
    want = torch.stack([sum(weight[b, j] * modules[int(index[b, j])](x[:, b]) for j in range(2)) for b in range(4)], dim=1)
    assert torch.equal(out.detach(), want.detach())  # the per-sentence path is the modules' arithmetic
    want.pow(2).sum().backward()
    for e, module in enumerate(modules):
        grad = module.fc1.weight.grad
        torch.testing.assert_close(layer.experts.fc1_weight.grad[e], torch.zeros(F, C) if grad is None else grad)


@pytest.mark.parametrize("routing", [("token", "target"), ("sentence", "pair"), ("token", "token")])
def test_a_state_dict_of_separate_expert_modules_loads_through_fairseqs_loader(routing):
    model, task = build_model(*routing)
    old = per_expert_layout(model.state_dict())
    assert "decoder.layers.1.moe.experts.3.fc2.bias" in old and "decoder.layers.1.moe.experts.fc2_bias" not in old
    other, _ = build_model(*routing, seed=1)
    other.load_state_dict(old, strict=True)  # fairseq's: upgrade_state_dict_named first
    for key, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], tensor), key
    batch = random_batch(task.source_dictionary)
    model.eval(), other.eval()
    assert torch.equal(model(**batch)[0], other(**batch)[0])


def test_stack_expert_state_refuses_a_gap_in_the_experts():
    state = {f"moe.experts.{e}.{name}": torch.zeros(2) for e in (0, 2) for name in EXPERT_NAMES}
    with pytest.raises(ValueError, match=r"moe.experts.\*.fc1.weight: experts \[0, 2\], expected 0..1"):
        stack_expert_state(state, "moe.experts.")


def old_checkpoint(path, out):
    state = safe_torch_load(path)
    state["model"] = per_expert_layout(state["model"])
    torch.save(state, out)
    return str(out)


def test_a_checkpoint_of_separate_expert_modules_translates_the_same(trained, data_dir, tmp_path):
    """fairseq-generate on a token/target checkpoint and on the same weights in the layout
    main wrote before the stacking: identical hypotheses and scores, greedy and beam."""
    new = trained.get("token", "target")
    old = old_checkpoint(new, tmp_path / "old.pt")
    assert "encoder.layers.1.moe.experts.0.fc1.weight" in safe_torch_load(old)["model"]
    for pair, beam in (("en-de", 1), ("ru-en", 4)):
        want = parse_generation(run_in_process(generate_command(data_dir, new, pair, beam)).stdout)
        got = parse_generation(run_in_process(generate_command(data_dir, old, pair, beam)).stdout)
        assert got == want and len(want) > 0


def save_old_sharded(model_state, args, stem, size):
    """The files main's ``save_sharded`` wrote: each shard's experts under local per-expert names."""
    old = per_expert_layout(model_state)
    sharded_checkpoint.save_sharded(model_state, args, stem, size)  # the shared file and metadata
    per_shard = args.moe_expert_count // size
    for shard in range(size):
        path = sharded_checkpoint.shard_path(stem, shard)
        state = safe_torch_load(path)
        state["model"] = {}
        for key, tensor in old.items():
            match = sharded_checkpoint.EXPERT_KEY.match(key)
            if match and int(match.group("index")) // per_shard == shard:
                local = int(match.group("index")) % per_shard
                state["model"][f"{match.group('layer')}.{local}.{match.group('rest')}"] = tensor
        torch.save(state, path)


@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
def test_sharded_checkpoints_of_either_layout_consolidate_to_the_model(tmp_path, layout):
    model, _ = build_model("token", "target")
    state = model.state_dict()
    stem = str(tmp_path / "checkpoint_last")
    if layout == "stacked":
        sharded_checkpoint.save_sharded(state, model.args, stem, 2)
        shard = safe_torch_load(sharded_checkpoint.shard_path(stem, 1))["model"]
        assert tuple(shard["decoder.layers.1.moe.experts.fc1_weight"].shape) == (2, 128, 64)
    else:
        save_old_sharded(state, model.args, stem, 2)
        assert "decoder.layers.1.moe.experts.1.fc1.weight" in safe_torch_load(sharded_checkpoint.shard_path(stem, 1))["model"]
    consolidated = sharded_checkpoint.consolidate(stem)["model"]
    assert set(consolidated) == set(state)
    for key, tensor in state.items():
        assert torch.equal(consolidated[key], tensor), key
    partial = sharded_checkpoint.consolidate(stem, shards=[1])["model"]  # experts 2, 3 only
    assert torch.equal(partial["decoder.layers.1.moe.experts.fc2_weight"][2:], state["decoder.layers.1.moe.experts.fc2_weight"][2:])


def test_resuming_a_checkpoint_of_separate_expert_modules_needs_reset_optimizer(trained, data_dir, tmp_path):
    """Its weights load, its optimizer state (per expert module) does not fit the stacks: one line
    naming --reset-optimizer, nothing written; with it, training goes on and saves stacks."""
    from cli_helpers import train_command, train_in_process
    from taskmoe_fairseq.errors import TaskMoeError

    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    old_checkpoint(trained.get("token", "target"), save_dir / "checkpoint_last.pt")
    before = sorted(os.listdir(save_dir))
    command = train_command(data_dir, str(save_dir), "token", "target", 13)
    with pytest.raises(TaskMoeError, match="holds its experts as separate modules .*resume with --reset-optimizer, which also starts .*--max-update to the updates still to run\)$"):
        train_in_process(command)
    assert sorted(os.listdir(save_dir)) == before
    train_in_process(command + ["--reset-optimizer"])
    state = safe_torch_load(str(save_dir / "checkpoint_last.pt"))
    assert state["model"]["decoder.layers.1.moe.experts.fc1_weight"].size(0) == 4
    assert not any(sharded_checkpoint.EXPERT_KEY.match(key) for key in state["model"])
