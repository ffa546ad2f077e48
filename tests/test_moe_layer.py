"""MoeFeedForward and the router against plain per-token loops over the routing definitions."""

import pytest
import torch

from model_helpers import build_model, random_batch
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.token_gate import TokenTopKGate

T, B, C, F, E = 6, 4, 8, 16, 6


def padding(with_padding):
    if not with_padding:
        return None
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :2] = True
    mask[2, :4] = True
    return mask


def token_reference(layer, x, padding_mask):
    """Each non-pad token on its own (no capacity): top-k of softmax(x W), weights renormalised."""
    out = torch.zeros_like(x)
    k = layer.gate.top_k
    for b in range(B):
        for t in range(T):
            if padding_mask is not None and padding_mask[b, t]:
                continue
            weights, index = (x[t, b] @ layer.gate.wg.weight.t()).softmax(-1).topk(k)
            if k > 1:
                weights = weights / weights.sum()
            for weight, expert in zip(weights, index):
                out[t, b] += weight * layer.experts.expert_module(int(expert))(x[t, b])
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("with_padding", [False, True])
def test_token_routing_matches_per_token_reference(top_k, with_padding):
    torch.manual_seed(0)
    layer = MoeFeedForward(C, F, E, TokenTopKGate(C, E, top_k)).eval()
    x, mask = torch.randn(T, B, C), padding(with_padding)
    with torch.no_grad():
        got, decision = layer(x, mask)
        want = token_reference(layer, x, mask)
    real = torch.ones(T, B, dtype=torch.bool) if mask is None else ~mask.t()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert (got[~real] == 0).all()  # pads are not routed
    assert decision.expert_index.shape == (int(real.sum()), top_k)


@pytest.mark.parametrize("policy", ["all", "sampling", "random"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_train_mode_token_routing_applies_exactly_the_gates_decision(policy, top_k):
    """In training (capacity, drops, second-expert policy), the output is the weighted sum of
    the experts the gate kept, weight by weight."""
    torch.manual_seed(0)
    layer = MoeFeedForward(C, F, E, TokenTopKGate(C, E, top_k, capacity_factor=0.6, second_expert_policy=policy))
    layer.train()
    x = torch.randn(T, B, C)
    torch.manual_seed(1)
    got, decision = layer(x, None)
    tokens = x.reshape(-1, C)
    want = torch.zeros_like(tokens)
    for row in range(tokens.size(0)):
        for weight, expert in zip(decision.expert_weight[row], decision.expert_index[row]):
            if weight > 0:
                want[row] += weight * layer.experts.expert_module(int(expert))(tokens[row])
    torch.testing.assert_close(got.reshape(-1, C), want, rtol=1e-5, atol=1e-5)
    capacity = layer.gate.capacity(tokens.size(0))
    kept = decision.expert_weight > 0
    for expert in range(E):
        assert int((kept & (decision.expert_index == expert)).sum()) <= capacity
    if top_k > 1:
        assert float(decision.dropped_share) > 0  # capacity 0.6 must drop something


def test_per_sentence_dispatch_matches_reference_for_mixed_expert_sets():
    torch.manual_seed(0)
    layer = MoeFeedForward(C, F, E).eval()
    x = torch.randn(T, B, C)
    index = torch.tensor([[0, 3], [2, 1], [0, 3], [5, 4]])
    weight = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1]])
    with torch.no_grad():
        got, decision = layer(x, None, index, weight)
        want = torch.stack(
            [sum(weight[b, j] * layer.experts.expert_module(int(index[b, j]))(x[:, b]) for j in range(2)) for b in range(B)], dim=1
        )
    assert decision is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="routed per sentence and needs the router's expert_index"):
        layer(x, None)


@pytest.mark.parametrize("routing", ["source", "target", "pair", "static-source", "static-target", "static-pair", "sentence"])
def test_router_decisions_follow_the_routing_definitions(routing):
    model, task = build_model(routing, routing)
    model.eval()
    batch = random_batch(task.source_dictionary)
    src, tgt, langs = batch["src_lang_id"], batch["tgt_lang_id"], 3
    seen = {}  # the decision the encoder's own forward hands its MoE layer (its kwargs)
    (encoder_index, _), = model.encoder.moe_router.layers["encoder"]
    model.encoder.layers[encoder_index].register_forward_pre_hook(
        lambda layer, args, kwargs: seen.update(kwargs), with_kwargs=True)
    encoder_out = model.encoder(batch["src_tokens"], batch["src_lengths"], src_lang_id=src, tgt_lang_id=tgt)
    router = model.encoder.moe_router
    pad = task.source_dictionary.pad()
    for side in ("encoder", "decoder"):
        (index, routed), = router.layers[side]
        if side == "encoder":
            experts, weights = seen["moe_expert_index"], seen["moe_expert_weight"]
        else:
            experts, weights = encoder_out["moe_decoder_expert_index"][0], encoder_out["moe_decoder_expert_weight"][0]
        gate = router.gates[f"{side}_{index}"]
        for b in range(B):
            s, t = int(src[b]), int(tgt[b])
            task_id = {"source": s, "target": t, "pair": s * langs + t}.get(routing.replace("static-", ""))
            if routing.startswith("static-"):
                want = [(task_id * 2 + j) % 4 for j in range(2)], [0.5, 0.5]
            elif routing == "sentence":
                real = batch["src_tokens"][b].ne(pad)
                if side == "encoder":  # the mean of the sentence's scaled token embeddings (no positions)
                    tokens = batch["src_tokens"][b][real]
                    summary = (model.encoder.embed_scale * model.encoder.embed_tokens(tokens)).mean(0)
                else:  # the mean of the encoder output over the sentence's tokens
                    summary = encoder_out["encoder_out"][0][real.nonzero().squeeze(1), b].mean(0)
                probs = (summary @ gate.wg.weight.t()).softmax(-1)
                top = probs.topk(2)
                want = top.indices.tolist(), (top.values / top.values.sum()).tolist()
            else:
                top = gate.task_logits[task_id].softmax(-1).topk(2)
                want = top.indices.tolist(), (top.values / top.values.sum()).tolist()
            assert experts[b].tolist() == want[0], (side, b)
            torch.testing.assert_close(weights[b], torch.tensor(want[1]), rtol=1e-5, atol=1e-6)
        assert weights.dtype == torch.float32


def test_backward_reaches_the_task_gate_and_only_the_used_experts():
    model, task = build_model("token", "target")
    model.train()
    batch = random_batch(task.source_dictionary)
    batch["tgt_lang_id"][:] = 1
    logits, extra = model(**batch)
    (logits.logsumexp(-1).mean() + sum(aux.gate_loss for aux in extra["moe_aux"])).backward()
    gate = model.encoder.moe_router.gates["decoder_1"]
    assert gate.task_logits.grad[1].abs().sum() > 0 and gate.task_logits.grad[0].abs().sum() == 0
    used = set(model.encoder(batch["src_tokens"], batch["src_lengths"], src_lang_id=batch["src_lang_id"],
                             tgt_lang_id=batch["tgt_lang_id"])["moe_decoder_expert_index"][0][0].tolist())
    grad = model.decoder.layers[1].moe.experts.fc1_weight.grad  # [E, F, C]: zero rows for unused experts
    for expert in range(grad.size(0)):
        assert bool(grad[expert].abs().sum() > 0) == (expert in used)
