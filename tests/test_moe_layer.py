"""MoeFeedForward against a plain per-token loop over the routing definition."""

import pytest
import torch

from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.routing_decision import RoutingInputs

T, B, C, F, E, K, LANGS = 6, 4, 8, 16, 6, 2, 3


def top_k(probs):
    weights, index = probs.topk(K)
    return weights / weights.sum(), index


def reference(layer: MoeFeedForward, x, padding_mask, inputs):
    """Route and run every non-pad token on its own, straight from the paper's definitions."""
    out = torch.zeros_like(x)
    for b in range(B):
        real = [t for t in range(T) if padding_mask is None or not padding_mask[b, t]]
        if layer.routing == routing_kinds.SENTENCE:
            probs = (x[real, b].mean(0) @ layer.gate.wg.weight.t()).softmax(-1)
            sentence_route = top_k(probs)
        elif routing_kinds.task_key(layer.routing):
            src, tgt = int(inputs.src_lang_id[b]), int(inputs.tgt_lang_id[b])
            task = {"source": src, "target": tgt, "pair": src * LANGS + tgt}[layer.task_key]
            if routing_kinds.is_static(layer.routing):
                sentence_route = (torch.full((K,), 1.0 / K), torch.tensor([(task * K + j) % E for j in range(K)]))
            else:
                sentence_route = top_k(layer.gate.task_logits[task].softmax(-1))
        for t in real:
            if layer.routing == routing_kinds.TOKEN:
                weights, index = top_k((x[t, b] @ layer.gate.wg.weight.t()).softmax(-1))
            else:
                weights, index = sentence_route
            for weight, expert in zip(weights, index):
                out[t, b] += weight * layer.experts[int(expert)](x[t, b])
    return out


@pytest.mark.parametrize("routing", routing_kinds.ROUTING_CHOICES)
@pytest.mark.parametrize("with_padding", [False, True])
def test_moe_layer_matches_per_token_reference(routing, with_padding):
    torch.manual_seed(0)
    layer = MoeFeedForward(routing, C, F, E, K, num_langs=LANGS).eval()
    x = torch.randn(T, B, C)
    padding_mask = None
    if with_padding:
        padding_mask = torch.zeros(B, T, dtype=torch.bool)
        padding_mask[0, :2] = True
        padding_mask[2, :4] = True
    inputs = RoutingInputs(src_lang_id=torch.tensor([0, 1, 0, 2]), tgt_lang_id=torch.tensor([1, 0, 1, 1]))
    with torch.no_grad():
        got = layer(x, padding_mask, inputs)
        want = reference(layer, x, padding_mask, inputs)
    real = torch.ones(T, B, dtype=torch.bool) if padding_mask is None else ~padding_mask.t()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    if routing == routing_kinds.TOKEN and with_padding:
        assert (got[~real] == 0).all()  # pads are not routed


def test_moe_layer_backward_reaches_gate_and_used_experts():
    torch.manual_seed(0)
    layer = MoeFeedForward("target", C, F, E, K, num_langs=LANGS).train()
    inputs = RoutingInputs(src_lang_id=torch.tensor([0, 1, 0, 2]), tgt_lang_id=torch.tensor([1, 1, 1, 1]))
    out = layer(torch.randn(T, B, C), None, inputs)
    (out.sum() + layer.last_decision.gate_loss).backward()
    assert layer.gate.task_logits.grad[1].abs().sum() > 0
    used = set(layer.last_decision.expert_index[0].tolist())
    for expert in range(E):
        has_grad = layer.experts[expert].fc1.weight.grad is not None
        assert has_grad == (expert in used)


def test_missing_language_ids_give_one_line_error():
    layer = MoeFeedForward("target", C, F, E, K, num_langs=LANGS)
    with pytest.raises(SystemExit, match="needs each sentence's languages.*multilingual_translation_taskmoe"):
        layer(torch.randn(T, B, C), None, RoutingInputs())
