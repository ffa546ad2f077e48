"""Label-smoothed cross-entropy plus the MoE load-balancing gate loss.

``loss = label_smoothed_ce + moe_gate_loss_wt * sum_layers(gate_loss) * sample_size``
(the gate loss is per token, the cross-entropy a sum over tokens, so scaling by
``sample_size`` keeps ``--moe-gate-loss-wt`` a per-token weight, as in GShard).

Logged through fairseq's metrics: ``moe_gate_loss`` (the sum over layers, 1.0
per token/task-gated layer when balanced), and per MoE layer (``enc1``,
``dec3``, ...) ``moe_drop_<layer>`` (share of token-assignments dropped by
capacity) and ``moe_balance_<layer>`` (largest expert's share times E: 1.0 is
perfectly balanced, E is everything on one expert); with
``--moe-log-expert-load`` also ``moe_load_<layer>_e<i>``, each expert's share.
"""

import re
from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward

GATE_LOSS = "moe_gate_loss"
DROP, BALANCE, LOAD = "moe_drop_", "moe_balance_", "moe_load_"


@dataclass
class MoeLabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_gate_loss_wt: float = field(default=0.01, metadata={"help": "weight of the summed MoE gate losses"})
    moe_log_expert_load: bool = field(
        default=False, metadata={"help": "also log every expert's share of tokens in every MoE layer"}
    )


def short_layer_name(module_name: str) -> str:
    """``module.decoder.layers.3.moe`` -> ``dec3``."""
    match = re.search(r"(encoder|decoder)\.layers\.(\d+)\.moe$", module_name)
    return f"{match.group(1)[:3]}{match.group(2)}" if match else module_name


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoeLabelSmoothedCrossEntropyConfig)
class MoeLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        moe_gate_loss_wt=0.01,
        moe_log_expert_load=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.moe_gate_loss_wt = moe_gate_loss_wt
        self.moe_log_expert_load = moe_log_expert_load

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        gate_loss = loss.new_zeros(())
        ntokens = sample["ntokens"]
        for name, moe in model.named_modules():
            if not isinstance(moe, MoeFeedForward) or moe.last_decision is None:
                continue
            decision, layer = moe.last_decision, short_layer_name(name)
            gate_loss = gate_loss + decision.gate_loss.to(gate_loss.dtype)
            logging_output[DROP + layer] = float(decision.dropped_share) * ntokens
            logging_output[BALANCE + layer] = float(decision.expert_load.max()) * moe.num_experts * ntokens
            if self.moe_log_expert_load:
                for expert, share in enumerate(decision.expert_load.tolist()):
                    logging_output[f"{LOAD}{layer}_e{expert}"] = share * ntokens
        loss = loss + self.moe_gate_loss_wt * gate_loss * sample_size
        logging_output["loss"] = loss.data
        logging_output[GATE_LOSS] = float(gate_loss) * sample_size
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        if sample_size > 0:
            gate_loss = sum(log.get(GATE_LOSS, 0) for log in logging_outputs)
            metrics.log_scalar(GATE_LOSS, gate_loss / sample_size, sample_size, round=3)
        if ntokens > 0:
            keys = sorted({key for log in logging_outputs for key in log if key.startswith((DROP, BALANCE, LOAD))})
            for key in keys:
                metrics.log_scalar(key, sum(log.get(key, 0) for log in logging_outputs) / ntokens, ntokens, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
