"""Pruning token-routed layers per pair as a model operation (``model.prune_token_experts``):
K = E gives the full model's hypotheses, a pruned gate chooses among its kept experts exactly
as the full gate does, K = 1 is a dense FFN, the usage counts are the gate's, and the error
cases are one line. The command-line paths are in test_prune_cli.py."""

import copy

import pytest
import torch

from model_helpers import build_model, fake_task, tiny_dictionary
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from test_extraction import PAIR, hypotheses, mixed_length_batch

DICTIONARY = tiny_dictionary(40)


def pair_batches(dictionary, count=3, batch=6):
    """Teacher-forcing batches of one pair (``PAIR``): ``net_input`` dicts."""
    batches = []
    for seed in range(count):
        net_input = mixed_length_batch(dictionary, batch=batch, seed=seed)
        generator = torch.Generator().manual_seed(100 + seed)
        prev = torch.randint(dictionary.nspecial, len(dictionary), (batch, 6), generator=generator)
        prev[:, 0] = dictionary.eos()
        net_input["prev_output_tokens"] = prev
        batches.append(net_input)
    return batches


def full_model(encoder="token", decoder="target", **overrides):
    model, _ = build_model(encoder, decoder, task=fake_task(DICTIONARY), **overrides)
    return model.eval()


def test_keeping_every_expert_gives_the_full_models_hypotheses_and_tensors():
    full = full_model()
    experts = int(full.args.moe_expert_count)
    pruned, rows = full.prune_token_experts(PAIR, pair_batches(DICTIONARY), experts)
    pruned.eval()
    assert pruned.args.moe_pruned_token_experts == experts and pruned.args.moe_extracted_lang_pair == PAIR
    token_rows = [row for row in rows if row["routing"] == "token"]
    assert [row["layer"] for row in token_rows] == ["encoder.1"]
    assert sorted(token_rows[0]["experts_kept"]) == list(range(experts)) and token_rows[0]["kept_share"] == pytest.approx(1.0)
    full_state = full.state_dict()
    for key, tensor in pruned.state_dict().items():
        if key.startswith("encoder.layers.1.moe."):
            assert torch.equal(tensor, full_state[key]), key
    batch = mixed_length_batch(DICTIONARY)
    for beam in (1, 4):
        assert hypotheses(pruned, DICTIONARY, batch, beam) == hypotheses(full, DICTIONARY, batch, beam)


def test_pruned_gate_is_the_full_gate_renormalised_over_the_kept_experts():
    full = full_model(moe_expert_count=6, moe_top_k=2)
    pruned, rows = full.prune_token_experts(PAIR, pair_batches(DICTIONARY), 3)
    pruned.eval()
    kept = sorted(rows[-1]["experts_kept"])
    full_gate, gate = full.encoder.layers[1].moe.gate, pruned.encoder.layers[1].moe.gate
    assert isinstance(pruned.encoder.layers[1].moe, MoeFeedForward) and gate.num_experts == 3 and gate.top_k == 2
    tokens = torch.randn(50, full_gate.wg.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        restricted = (tokens @ full_gate.wg.weight.t())[:, kept].softmax(-1)
        decision = gate(tokens)
    want_weights, want_index = restricted.topk(2, dim=-1)
    assert torch.equal(decision.expert_index, want_index)
    torch.testing.assert_close(decision.expert_weight, want_weights / want_weights.sum(-1, keepdim=True))


def test_usage_counts_are_the_gates_top_k_assignments_and_the_most_used_are_kept():
    full = full_model(moe_expert_count=6, moe_top_k=2)
    batches = pair_batches(DICTIONARY)
    gate = full.encoder.layers[1].moe.gate
    seen = []
    handle = gate.register_forward_hook(lambda module, inputs, decision: seen.append(decision.expert_index.clone()))
    with torch.no_grad():
        for net_input in batches:
            full(**net_input)
    handle.remove()
    counts = torch.bincount(torch.cat(seen).reshape(-1), minlength=6).double()
    for keep in (1, 2, 4):
        _, rows = full.prune_token_experts(PAIR, batches, keep)
        row = rows[-1]
        order = sorted(range(6), key=lambda e: (-float(counts[e]), e))
        assert row["experts_kept"] == order[:keep]
        assert row["token_share"] == [round(float(counts[e] / counts.sum()), 6) for e in order[:keep]]
        assert row["tokens"] == sum(int(n["src_lengths"].sum()) for n in batches)


def test_importance_metric_ranks_by_summed_gate_probability():
    full = full_model(moe_expert_count=6, moe_top_k=2)
    batches = pair_batches(DICTIONARY)
    gate = full.encoder.layers[1].moe.gate
    summed = torch.zeros(6, dtype=torch.float64)

    def record(module, inputs, decision):
        summed.add_((inputs[0] @ module.wg.weight.t()).softmax(-1).sum(0).double())

    handle = gate.register_forward_hook(record)
    with torch.no_grad():
        for net_input in batches:
            full(**net_input)
    handle.remove()
    _, rows = full.prune_token_experts(PAIR, batches, 2, metric="importance")
    assert rows[-1]["experts_kept"] == sorted(range(6), key=lambda e: (-float(summed[e]), e))[:2]


def test_keeping_one_expert_gives_a_dense_ffn_equal_to_that_expert():
    full = full_model()
    pruned, rows = full.prune_token_experts(PAIR, pair_batches(DICTIONARY), 1)
    moe = pruned.encoder.layers[1].moe
    assert isinstance(moe, ExtractedFeedForward) and len(moe.experts) == 1 and moe.expert_weights.tolist() == [1.0]
    expert = full.encoder.layers[1].moe.experts.expert_module(rows[-1]["experts_kept"][0])
    x = torch.randn(3, 2, expert.fc1.in_features)
    with torch.no_grad():
        assert torch.equal(moe(x)[0], expert(x))
    assert not any(".gate." in key for key in pruned.state_dict() if key.startswith("encoder.layers.1."))
    assert pruned.args.moe_pruned_token_experts == 1


def test_pruned_model_saves_and_loads_as_built_from_its_args():
    full = full_model()
    pruned, _ = full.prune_token_experts(PAIR, pair_batches(DICTIONARY), 2)
    rebuilt = type(pruned).build_model(copy.deepcopy(pruned.args), fake_task(DICTIONARY))
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    batch = mixed_length_batch(DICTIONARY)
    assert hypotheses(rebuilt.eval(), DICTIONARY, batch, 2) == hypotheses(pruned.eval(), DICTIONARY, batch, 2)


def test_token_token_model_prunes_both_sides():
    full = full_model("token", "token")
    pruned, rows = full.prune_token_experts(PAIR, pair_batches(DICTIONARY), 2)
    assert [row["layer"] for row in rows] == ["encoder.1", "decoder.1"]
    assert all(len(getattr(pruned, side).layers[1].moe.experts) == 2 for side in ("encoder", "decoder"))


@pytest.mark.parametrize(
    "routing, keep, message",
    [
        (("token", "target"), 0, "must be between 1 and the model's 4 experts"),
        (("token", "target"), 5, "must be between 1 and the model's 4 experts"),
        (("target", "target"), 2, "no MoE layer routes per token"),
    ],
)
def test_bad_requests_are_one_line(routing, keep, message):
    full = full_model(*routing)
    with pytest.raises(TaskMoeError, match=message) as error:
        full.prune_token_experts(PAIR, pair_batches(DICTIONARY), keep)
    assert "\n" not in str(error.value)


def test_no_tokens_and_decoder_without_targets_are_one_line():
    full = full_model()
    with pytest.raises(TaskMoeError, match="no token for layer encoder.1"):
        full.prune_token_experts(PAIR, [], 2)
    source_only = [{k: v for k, v in b.items() if k != "prev_output_tokens"} for b in pair_batches(DICTIONARY)]
    with pytest.raises(TaskMoeError, match="needs the pair's target text"):
        full_model("token", "token").prune_token_experts(PAIR, source_only, 2)
    pruned, _ = full.prune_token_experts(PAIR, source_only, 2)  # encoder-only token routing: source text is enough
    with pytest.raises(TaskMoeError, match="already extracted"):
        pruned.prune_token_experts(PAIR, source_only, 2)
