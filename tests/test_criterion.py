"""moe_label_smoothed_cross_entropy on hand-computable cases: the loss arithmetic, the
logged metrics, validation without the gate loss, per-pair losses from one mixed forward."""

import math
import types

import pytest
import torch
import torch.nn as nn

from taskmoe_fairseq.criterions.moe_label_smoothed_cross_entropy import MoeLabelSmoothedCrossEntropyCriterion
from taskmoe_fairseq.modules.routing_decision import MoeAux

PAD, V = 1, 4
LANGS, PAIRS = ["en", "de", "fr"], ["en-de", "de-en", "en-fr"]


class FixedModel(nn.Module):
    """Returns the given log-probabilities ``[B, T, V]`` and MoE aux outputs."""

    def __init__(self, lprobs, aux):
        super().__init__()
        self.lprobs, self.aux = lprobs, aux

    def forward(self, **net_input):
        return self.lprobs, {"moe_aux": self.aux}

    def get_normalized_probs(self, net_output, log_probs=True):
        return net_output[0]

    def get_targets(self, sample, net_output):
        return sample["target"]


def criterion(eps=0.1, weight=0.01):
    task = types.SimpleNamespace(target_dictionary=types.SimpleNamespace(pad=lambda: PAD), langs=LANGS, lang_pairs=PAIRS)
    return MoeLabelSmoothedCrossEntropyCriterion(task, False, eps, moe_gate_loss_wt=weight)


def case():
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], [[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]]])
    target = torch.tensor([[3, 0], [0, PAD]])  # 3 real tokens
    aux = [
        MoeAux("encoder.1", torch.tensor(1.5), torch.tensor([0.5, 0.25, 0.25, 0.0]), torch.tensor(0.1)),
        MoeAux("decoder.1", torch.tensor(2.0), torch.tensor([0.25, 0.25, 0.25, 0.25]), torch.tensor(0.0)),
    ]
    sample = {
        "net_input": {"src_lang_id": torch.tensor([0, 0]), "tgt_lang_id": torch.tensor([1, 2])},
        "target": target,
        "ntokens": 3,
    }
    return FixedModel(probs.log(), aux), sample, probs, target


def smoothed(probs, target, eps):
    """fairseq's label smoothing, by hand: (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum(-log p)."""
    eps_i = eps / (V - 1)
    total = 0.0
    for b in range(target.size(0)):
        for t in range(target.size(1)):
            if target[b, t] == PAD:
                continue
            nll = -math.log(probs[b, t, target[b, t]])
            smooth = -sum(math.log(p) for p in probs[b, t])
            total += (1 - eps - eps_i) * nll + eps_i * smooth
    return total


def test_training_loss_is_smoothed_ce_plus_weighted_gate_loss_times_sample_size():
    model, sample, probs, target = case()
    model.train()
    loss, sample_size, log = criterion()(model, sample)
    ce = smoothed(probs, target, 0.1)
    assert sample_size == 3
    assert float(loss) == pytest.approx(ce + 0.01 * (1.5 + 2.0) * 3, rel=1e-6)
    assert log["moe_gate_loss"] == pytest.approx(3.5 * 3)
    assert float(log["nll_loss"]) == pytest.approx(-math.log(0.4) - math.log(0.25) - math.log(0.7), rel=1e-6)
    assert log["moe_drop_encoder.1"] == pytest.approx(0.1 * 3)
    assert log["moe_balance_encoder.1"] == pytest.approx(0.5 * 4 * 3)  # largest share x E, per token
    assert log["moe_balance_decoder.1"] == pytest.approx(1.0 * 3)


def test_validation_loss_leaves_the_gate_loss_out_and_reports_each_pair_from_one_forward():
    model, sample, probs, target = case()
    model.eval()
    loss, _, log = criterion()(model, sample)
    assert float(loss) == pytest.approx(smoothed(probs, target, 0.1), rel=1e-6)  # no gate loss: model selection
    assert log["moe_gate_loss"] == pytest.approx(3.5 * 3)  # still logged
    first, second = smoothed(probs[:1], target[:1], 0.1), smoothed(probs[1:], target[1:], 0.1)
    assert log["pair_loss:en-de"] == pytest.approx(first, rel=1e-6)
    assert log["pair_loss:en-fr"] == pytest.approx(second, rel=1e-6)
    assert log["pair_ntokens:en-de"] == 2 and log["pair_ntokens:en-fr"] == 1
    assert log["pair_loss:de-en"] == 0.0  # every pair's key, on every rank


def test_reduce_metrics_divides_by_sample_size_in_bits(monkeypatch):
    logged = {}
    from fairseq import metrics

    monkeypatch.setattr(metrics, "log_scalar", lambda key, value, *a, **k: logged.__setitem__(key, value))
    monkeypatch.setattr(metrics, "log_derived", lambda *a, **k: None)
    logs = [
        {"loss": 6.0, "nll_loss": 3.0, "ntokens": 3, "sample_size": 3, "moe_gate_loss": 9.0, "moe_balance_decoder.1": 6.0,
         "pair_loss:en-de": 2.0, "pair_nll_loss:en-de": 1.0, "pair_ntokens:en-de": 2.0, "pair_sample_size:en-de": 2.0},
        {"loss": 2.0, "nll_loss": 1.0, "ntokens": 1, "sample_size": 1, "moe_gate_loss": 1.0, "moe_balance_decoder.1": 2.0,
         "pair_loss:en-de": 0.0, "pair_nll_loss:en-de": 0.0, "pair_ntokens:en-de": 0.0, "pair_sample_size:en-de": 0.0},
    ]
    MoeLabelSmoothedCrossEntropyCriterion.reduce_metrics(logs)
    assert logged["loss"] == pytest.approx(8.0 / 4 / math.log(2))
    assert logged["moe_gate_loss"] == pytest.approx(10.0 / 4)
    assert logged["moe_balance_decoder.1"] == pytest.approx(8.0 / 4)
    assert logged["loss_en-de"] == pytest.approx(2.0 / 2 / math.log(2))
