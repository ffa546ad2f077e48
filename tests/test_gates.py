import math

import pytest
import torch

from taskmoe_fairseq.modules.routing_decision import load_balancing_loss
from taskmoe_fairseq.modules.static_gate import StaticTaskGate
from taskmoe_fairseq.modules.task_gate import TaskGate
from taskmoe_fairseq.modules.token_gate import TokenTopKGate


def test_task_gate_sends_every_token_of_a_task_to_the_same_k_experts():
    torch.manual_seed(0)
    gate = TaskGate(num_tasks=5, num_experts=8, top_k=2)
    task_ids = torch.tensor([3, 1, 3, 3, 0, 1])
    decision = gate(task_ids, sentence_tokens=torch.tensor([4.0, 2, 7, 1, 3, 5]))
    assert decision.per_sentence
    for task in task_ids.unique():
        rows = (task_ids == task).nonzero().squeeze(1)
        assert (decision.expert_index[rows] == decision.expert_index[rows[0]]).all()
        assert torch.equal(decision.expert_weight[rows], decision.expert_weight[rows[0]].expand(len(rows), -1))
    torch.testing.assert_close(decision.expert_weight.sum(-1), torch.ones(6))
    assert (decision.expert_index[:, 0] != decision.expert_index[:, 1]).all()
    assert float(decision.dropped_share) == 0.0


def test_task_gate_decision_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    gate = TaskGate(num_tasks=4, num_experts=8, top_k=2)
    alone = gate(torch.tensor([2]), torch.tensor([5.0]))
    mixed = gate(torch.tensor([0, 2, 1, 3]), torch.tensor([1.0, 5, 9, 2]))
    assert torch.equal(alone.expert_index[0], mixed.expert_index[1])
    assert torch.equal(alone.expert_weight[0], mixed.expert_weight[1])


def test_load_balancing_loss_is_one_when_perfectly_balanced_and_e_when_collapsed():
    experts = 4
    uniform = torch.full((8, experts), 1.0 / experts)
    balanced_top1 = torch.arange(8) % experts
    assert float(load_balancing_loss(uniform, balanced_top1)) == pytest.approx(1.0)
    collapsed = torch.zeros(8, experts)
    collapsed[:, 0] = 1.0
    assert float(load_balancing_loss(collapsed, torch.zeros(8, dtype=torch.long))) == pytest.approx(experts)


def test_token_gate_aux_loss_is_one_for_balanced_orthogonal_tokens():
    gate = TokenTopKGate(model_dim=4, num_experts=4, top_k=2, capacity_factor=0)
    gate.eval()
    with torch.no_grad():
        gate.wg.weight.copy_(torch.eye(4))
    # near-zero logits: probabilities are uniform (mean 1/E per expert), yet each
    # token's first choice is its own expert, two tokens per expert
    tokens = torch.eye(4).repeat(2, 1) * 1e-6
    decision = gate(tokens)
    assert float(decision.gate_loss) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(decision.expert_index[:, 0], torch.arange(8) % 4)


def test_token_gate_respects_capacity_and_counts_dropped_assignments():
    torch.manual_seed(0)
    gate = TokenTopKGate(model_dim=4, num_experts=4, top_k=2, capacity_factor=1.0, second_expert_policy="all")
    gate.train()
    with torch.no_grad():
        gate.wg.weight.zero_()
        gate.wg.weight[0, 0] = 10.0  # everyone's first choice is expert 0
        gate.wg.weight[1, 0] = 5.0  # and second choice expert 1
    tokens = torch.zeros(16, 4)
    tokens[:, 0] = 1.0
    decision = gate(tokens)
    capacity = math.ceil(1.0 * 2 * 16 / 4)  # 8 slots per expert
    kept = decision.expert_weight > 0
    for expert in range(4):
        assert int((kept & (decision.expert_index == expert)).sum()) <= capacity
    # 16 first choices for expert 0 (8 kept), 16 second choices for expert 1 (8 kept)
    assert float(decision.dropped_share) == pytest.approx(16 / 32)
    # slots go in token order: the first 8 tokens keep both experts
    assert kept[:8].all() and not kept[8:].any()


def test_token_gate_drops_nothing_at_evaluation_by_default():
    gate = TokenTopKGate(model_dim=4, num_experts=4, top_k=2, capacity_factor=1.0)
    gate.eval()
    with torch.no_grad():
        gate.wg.weight.zero_()
        gate.wg.weight[0, 0] = 10.0
    tokens = torch.zeros(16, 4)
    tokens[:, 0] = 1.0
    decision = gate(tokens)
    assert (decision.expert_weight > 0).all()
    assert float(decision.dropped_share) == 0.0


def test_random_second_expert_policy_only_acts_in_training():
    torch.manual_seed(0)
    gate = TokenTopKGate(model_dim=8, num_experts=4, top_k=2, capacity_factor=0, second_expert_policy="random")
    tokens = torch.randn(200, 8)
    gate.train()
    trained = gate(tokens)
    assert (trained.expert_weight[:, 1] == 0).any()
    gate.eval()
    evaluated = gate(tokens)
    assert (evaluated.expert_weight > 0).all()


def test_static_gate_assigns_k_distinct_experts_deterministically():
    gate = StaticTaskGate(num_experts=8, top_k=2)
    decision = gate(torch.tensor([0, 1, 5, 1]), torch.ones(4))
    assert decision.expert_index.tolist() == [[0, 1], [2, 3], [2, 3], [2, 3]]
    assert torch.equal(decision.expert_weight, torch.full((4, 2), 0.5))
    assert float(decision.gate_loss) == 0.0


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_sampling_policy_attaches_each_weight_to_its_own_expert(top_k):
    """The weight of every kept expert is its renormalised gate probability (k >= 3 used to be re-sorted)."""
    torch.manual_seed(0)
    gate = TokenTopKGate(model_dim=8, num_experts=6, top_k=top_k, capacity_factor=0, second_expert_policy="sampling")
    gate.train()
    tokens = torch.randn(500, 8)
    decision = gate(tokens)
    probs = (tokens @ gate.wg.weight.t()).softmax(-1)
    chosen = probs.gather(1, decision.expert_index)
    want = chosen if top_k == 1 else chosen / chosen.sum(-1, keepdim=True)
    torch.testing.assert_close(decision.expert_weight, want)
    assert torch.equal(decision.expert_index[:, 0], probs.argmax(-1))  # the first choice is never sampled
    assert (decision.expert_index.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_parameters_stay_float32_when_the_model_is_converted(dtype):
    from taskmoe_fairseq.modules.sentence_gate import SentenceTopKGate
    from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward

    for gate in (TaskGate(3, 4), TokenTopKGate(8, 4), SentenceTopKGate(8, 4)):
        before = {name: p.detach().clone() for name, p in gate.named_parameters()}
        gate.to(dtype)
        for name, p in gate.named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    extracted = ExtractedFeedForward(8, 16, 2).to(dtype)
    assert extracted.expert_weights.dtype == torch.float32
    assert extracted.experts[0].fc1.weight.dtype == dtype  # the experts do convert



def _gate_calls():
    """(name, gate, inputs) for every gate kind, token gates in training and evaluation."""
    from taskmoe_fairseq.modules.sentence_gate import SentenceTopKGate

    torch.manual_seed(0)
    tokens, sentence_tokens = torch.randn(300, 16), torch.tensor([4.0, 2, 7, 1, 3, 5])
    task_ids = torch.tensor([3, 1, 3, 3, 0, 1])
    calls = []
    for policy in ("all", "sampling", "random"):
        for training in (True, False):
            gate = TokenTopKGate(16, 8, top_k=2, capacity_factor=1.0, second_expert_policy=policy).train(training)
            calls.append((f"token {policy} {'train' if training else 'eval'}", gate, (tokens,)))
    calls.append(("sentence", SentenceTopKGate(16, 8, top_k=2), (torch.randn(6, 16), sentence_tokens)))
    calls.append(("task", TaskGate(num_tasks=5, num_experts=8, top_k=2), (task_ids, sentence_tokens)))
    calls.append(("task softmax", TaskGate(5, 8, 2, renormalize=False), (task_ids, sentence_tokens)))
    calls.append(("static", StaticTaskGate(num_experts=8, top_k=2), (task_ids, sentence_tokens)))
    return calls


def test_every_gate_computes_in_float32_under_autocast():
    """``--amp`` / ``torch.autocast``: autocast runs ``linear`` in low precision whatever its
    inputs' dtype; the gates turn it off, so the decision under CPU autocast (bfloat16) is the
    float32 one, bit for bit (logits rounded to bfloat16 changed weights and experts)."""
    for name, gate, inputs in _gate_calls():
        rng = torch.get_rng_state()
        want = gate(*inputs)
        torch.set_rng_state(rng)  # the same noise for the sampling and random policies
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = gate(*inputs)
        for field in ("expert_weight", "gate_loss", "expert_load", "dropped_share"):
            assert getattr(got, field).dtype == torch.float32, (name, field, getattr(got, field).dtype)
            assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)
        assert torch.equal(got.expert_index, want.expert_index), name
    task_gate = TaskGate(num_tasks=5, num_experts=8, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, weights, _ = task_gate.route_tasks(torch.arange(5))
    assert probs.dtype == weights.dtype == torch.float32

def _expert_weight_gradient(renormalize):
    """Gradient of a loss that depends on the task's k weights only (as the cross-entropy does)."""
    torch.manual_seed(0)
    gate = TaskGate(num_tasks=3, num_experts=8, top_k=2, renormalize=renormalize)
    decision = gate(torch.tensor([1, 1]), torch.tensor([5.0, 3.0]))
    (decision.expert_weight[:, 0] * 2.0 - decision.expert_weight[:, 1]).sum().backward()
    chosen = set(decision.expert_index[0].tolist())
    others = [e for e in range(8) if e not in chosen]
    return gate.task_logits.grad[1], sorted(chosen), others


def test_top_k_task_weights_give_the_unchosen_experts_no_gradient():
    """GShard's renormalised top-k weights depend on the k chosen logits' difference only: the
    cross-entropy cannot raise a chosen expert above the others (why task gates stay soft)."""
    grad, chosen, others = _expert_weight_gradient(renormalize=True)
    # zero up to float32 rounding of the softmax normaliser (analytically exactly zero)
    assert float(grad[others].abs().max()) < 1e-6
    assert abs(float(grad[chosen].sum())) < 1e-6 and float(grad[chosen].abs().min()) > 1e-3


def test_softmax_task_weights_reach_every_experts_logit():
    """``--moe-task-gate-weights softmax``: the weights are the probabilities themselves, so the
    gradient reaches the E - k other logits through the softmax's normaliser."""
    grad, chosen, others = _expert_weight_gradient(renormalize=False)
    assert float(grad[others].abs().min()) > 1e-3
    gate = TaskGate(num_tasks=3, num_experts=8, top_k=2, renormalize=False)
    probs, weights, experts = gate.route_tasks(torch.tensor([0, 2]))
    assert torch.equal(weights, probs.gather(1, experts)) and bool((weights.sum(-1) < 1).all())


def test_static_warm_start_puts_every_task_on_its_static_experts():
    """``--moe-task-gate-init static``: each task starts on the static baseline's k experts
    (logits STATIC_INIT_MARGIN above the rest), for a task table of target languages and of pairs."""
    from taskmoe_fairseq.modules.task_gate import STATIC_INIT_MARGIN

    for num_tasks in (7, 49):
        tasks = torch.arange(num_tasks)
        gate = TaskGate(num_tasks=num_tasks, num_experts=8, top_k=2, init="static")
        probs, weights, experts = gate.route_tasks(tasks)
        _, static_experts = StaticTaskGate(8, 2).route_tasks(tasks)
        assert torch.equal(experts.sort(-1).values, static_experts.sort(-1).values)
        expected = math.exp(STATIC_INIT_MARGIN) / (2 * math.exp(STATIC_INIT_MARGIN) + 6)
        assert torch.allclose(probs.gather(1, experts), torch.full((num_tasks, 2), expected))
        assert torch.allclose(weights, torch.full((num_tasks, 2), 0.5))
    torch.manual_seed(0)  # a random table that differs from the static one (a rare draw could equal it)
    random = TaskGate(num_tasks=7, num_experts=8, top_k=2)
    assert not torch.equal(random.route_tasks(torch.arange(7))[2].sort(-1).values,
                           StaticTaskGate(8, 2).route_tasks(torch.arange(7))[1].sort(-1).values)
    with pytest.raises(ValueError, match="'random' or 'static'"):
        TaskGate(num_tasks=7, num_experts=8, init="uniform")


def test_the_model_option_reaches_the_router():
    from model_helpers import build_model

    model, _ = build_model("token", "target", moe_task_gate_init="static")
    logits = [gate.task_logits for gate in model.encoder.moe_router.gates.values() if hasattr(gate, "task_logits")]
    assert logits and all(float(table.max()) == 3.0 and int((table > 0).sum(-1).max()) == 2 for table in logits)
    plain, _ = build_model("token", "target")
    assert all(float(g.task_logits.min()) < 0 for g in plain.encoder.moe_router.gates.values() if hasattr(g, "task_logits"))
