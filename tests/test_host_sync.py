"""A decoding step of a task-routed layer never waits for the device (issue 29).

On a GPU every ``Tensor.item``, ``tolist``, ``__bool__``, ``torch.unique`` or ``nonzero`` stalls
the stream until the kernels before it finish. A task- or static-routed layer's experts are fixed
for the whole generation (decided once, in the encoder's router), so beam search's decoding steps
2..N must run it without any of them. Counted with torch's public ``TorchFunctionMode``, which sees
every torch function and Tensor method call, while forward hooks say which layer is running.
"""

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from torch.overrides import TorchFunctionMode

from model_helpers import build_model, random_batch
from taskmoe_fairseq.modules.moe_transformer_layer import MoeDecoderLayer

SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.unique, torch.Tensor.unique,
           torch.nonzero, torch.Tensor.nonzero, torch.Tensor.__int__, torch.Tensor.__float__}


class CountSyncs(TorchFunctionMode):
    """Counts host-synchronising calls made while ``self.inside`` is set."""

    def __init__(self):
        super().__init__()
        self.inside, self.calls = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.inside and func in SYNCING:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def syncs_in_decoder_moe_layers(encoder_routing, decoder_routing, same_pair=True):
    model, task = build_model(encoder_routing, decoder_routing)
    model.eval()
    batch = random_batch(task.source_dictionary)
    net_input = {k: batch[k] for k in ("src_tokens", "src_lengths", "src_lang_id", "tgt_lang_id")}
    if same_pair:  # what fairseq-generate, translate and the server decode: one pair per batch
        net_input["src_lang_id"] = torch.zeros_like(net_input["src_lang_id"])
        net_input["tgt_lang_id"] = torch.ones_like(net_input["tgt_lang_id"])
    counter, steps = CountSyncs(), []
    layers = [layer for layer in model.decoder.layers if isinstance(layer, MoeDecoderLayer)]
    assert layers, "the model has a decoder MoE layer"

    def enter(module, args):
        if module is layers[0]:
            steps.append(1)  # every decoding step calls every layer once
        counter.inside = len(steps) >= 3  # decoding steps 2..N (the first is step 0)

    def leave(module, args, output):
        counter.inside = False

    for layer in layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=4, max_len_b=10, min_len=10)
    with torch.no_grad(), counter:
        hypotheses = generator.generate([model], {"net_input": net_input})
    assert len(steps) >= 10 and len(hypotheses) == 4
    return counter.calls


@pytest.mark.parametrize("encoder_routing", ["target", "token"])
def test_decoding_steps_of_a_target_routed_decoder_layer_never_sync(encoder_routing):
    assert syncs_in_decoder_moe_layers(encoder_routing, "target") == []


def test_mixed_pairs_still_decode_without_syncing_the_task_routed_layer():
    """Several expert sets in one batch (the server can batch pairs that share nothing)."""
    assert syncs_in_decoder_moe_layers("target", "target", same_pair=False) == []


def test_the_counter_sees_a_token_routed_layer_syncing():
    """The counter is not blind: a token-routed decoder layer sorts its tokens per step."""
    assert syncs_in_decoder_moe_layers("target", "token")


@pytest.mark.parametrize("training", [True, False])
def test_the_criterion_reads_nothing_back_between_forward_and_backward(training):
    """Its logged values (gate loss, drop and balance shares, per-expert load, per-pair losses)
    stay tensors until fairseq's logging reduces them."""
    from test_criterion import case, criterion

    model, sample, _, _ = case()
    model.train(training)
    moe_criterion = criterion()
    moe_criterion.moe_log_expert_load = True
    counter = CountSyncs()
    counter.inside = True
    with counter:
        _, _, log = moe_criterion(model, sample)
    assert counter.calls == []
    assert float(log["moe_load_encoder.1_e0"]) == pytest.approx(0.5 * 3)


def test_the_task_gate_reads_nothing_back_and_decides_as_per_sentence():
    """The gate runs on its whole task table (no ``torch.unique`` over the batch's tasks); each
    sentence gets its task's row, and absent tasks add nothing to the gate loss."""
    from taskmoe_fairseq.modules.routing_decision import load_balancing_loss
    from taskmoe_fairseq.modules.task_gate import TaskGate

    torch.manual_seed(0)
    gate = TaskGate(num_tasks=5, num_experts=4, top_k=2)
    task_ids, tokens = torch.tensor([3, 1, 3, 3]), torch.tensor([2.0, 5.0, 1.0, 4.0])
    counter = CountSyncs()
    counter.inside = True
    with counter:
        decision = gate(task_ids, tokens)
    assert counter.calls == []
    probs, weights, index = gate.route_tasks(torch.tensor([1, 3]))
    assert torch.equal(decision.expert_index, index[[1, 0, 1, 1]])
    assert torch.equal(decision.expert_weight, weights[[1, 0, 1, 1]])
    expected_loss = load_balancing_loss(probs, index[:, 0], torch.tensor([5.0, 7.0]))
    assert torch.allclose(decision.gate_loss, expected_loss, rtol=1e-6)
