"""Label-smoothed cross-entropy plus the MoE load-balancing gate loss.

In training, ``loss = label_smoothed_ce + moe_gate_loss_wt * sum_layers(gate_loss) * sample_size``
(the gate loss is per token, the cross-entropy a sum over tokens, so scaling by
``sample_size`` keeps ``--moe-gate-loss-wt`` a per-token weight, as in GShard).
At validation ``loss`` is the label-smoothed cross-entropy alone, so
``checkpoint_best.pt`` and plateau schedulers never select on the gate loss;
``moe_gate_loss`` is still logged.

The gate losses come with the model's output (``net_output[1]["moe_aux"]``, one
:class:`~taskmoe_fairseq.modules.routing_decision.MoeAux` per MoE layer that
ran), as fairseq's MoE branch returns ``l_aux`` with the decoder's extra; the
criterion keeps no reference to the model's modules.

Logged through fairseq's metrics: ``moe_gate_loss`` (the sum over layers, 1.0
per learned gate when balanced), and per MoE layer (``encoder.1``,
``decoder.3``, ...) ``moe_drop_<layer>`` (share of token-assignments dropped by
capacity) and ``moe_balance_<layer>`` (largest expert's share times E: 1.0 is
perfectly balanced, E is everything on one expert); with
``--moe-log-expert-load`` also ``moe_load_<layer>_e<i>``. When batches carry
language ids, validation also logs ``loss_<pair>`` / ``nll_loss_<pair>``,
computed from the same forward over the mixed batch (per-sentence losses summed
by pair).
"""

import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)

from taskmoe_fairseq.modules import routing_kinds

GATE_LOSS = "moe_gate_loss"
DROP, BALANCE, LOAD = "moe_drop_", "moe_balance_", "moe_load_"
PAIR_LOSS, PAIR_NLL_LOSS, PAIR_SAMPLE_SIZE, PAIR_NTOKENS = "pair_loss:", "pair_nll_loss:", "pair_sample_size:", "pair_ntokens:"


@dataclass
class MoeLabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_gate_loss_wt: float = field(default=0.01, metadata={"help": "weight of the summed MoE gate losses"})
    moe_log_expert_load: bool = field(
        default=False, metadata={"help": "also log every expert's share of tokens in every MoE layer"}
    )


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
        net_output = model(**sample["net_input"])
        token_loss, token_nll = self.token_losses(model, net_output, sample)
        loss, nll_loss = token_loss.sum(), token_nll.sum()
        ntokens = sample["ntokens"]
        sample_size = sample["target"].size(0) if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": ntokens,
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.data
            logging_output["total"] = total.data

        # Logged values stay tensors (detached) until fairseq's logging reduces them: reading them
        # here (float, tolist) would make the host wait for the device between forward and backward.
        gate_loss = loss.new_zeros(())
        for aux in net_output[1].get("moe_aux", []):
            gate_loss = gate_loss + aux.gate_loss.to(gate_loss.dtype)
            load = aux.expert_load.detach().float()
            logging_output[DROP + aux.layer] = aux.dropped_share.detach().float() * ntokens
            logging_output[BALANCE + aux.layer] = load.max() * load.numel() * ntokens
            if self.moe_log_expert_load:
                for expert in range(load.numel()):
                    logging_output[f"{LOAD}{aux.layer}_e{expert}"] = load[expert] * ntokens
        logging_output[GATE_LOSS] = gate_loss.detach() * sample_size
        if model.training:
            loss = loss + self.moe_gate_loss_wt * gate_loss * sample_size
            logging_output["loss"] = loss.data
        else:
            logging_output.update(self.pair_losses(sample, token_loss, token_nll))
        if not reduce:  # (fairseq's criterions return per-token losses then)
            return token_loss, sample_size, logging_output
        return loss, sample_size, logging_output

    def token_losses(self, model, net_output, sample):
        """Label-smoothed and plain NLL losses ``[B, T]`` (zero at pads)."""
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target = model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            lprobs = lprobs[:, self.ignore_prefix_size :, :].contiguous()
            target = target[:, self.ignore_prefix_size :].contiguous()
        loss, nll_loss = label_smoothed_nll_loss(
            lprobs.view(-1, lprobs.size(-1)), target.view(-1), self.eps, ignore_index=self.padding_idx, reduce=False
        )
        return loss.view(target.shape), nll_loss.view(target.shape)

    def pair_losses(self, sample, token_loss, token_nll):
        """``pair_loss:<pair>`` etc. for every pair of the task (the same keys on every rank:
        fairseq all-reduces logs by name), summed from this batch's sentences."""
        net_input = sample["net_input"]
        langs, pairs = getattr(self.task, "langs", None), getattr(self.task, "lang_pairs", None)
        if "src_lang_id" not in net_input or not langs or not pairs:
            return {}
        num_langs = len(langs)
        pair_id = routing_kinds.task_ids("pair", net_input["src_lang_id"], net_input["tgt_lang_id"], num_langs)
        target = sample["target"]
        if self.ignore_prefix_size > 0:
            target = target[:, self.ignore_prefix_size :]
        tokens = target.ne(self.padding_idx).sum(dim=1).float()
        sums = {}
        for name, values in (
            (PAIR_LOSS, token_loss.detach().float().sum(dim=1)),
            (PAIR_NLL_LOSS, token_nll.detach().float().sum(dim=1)),
            (PAIR_NTOKENS, tokens),
            (PAIR_SAMPLE_SIZE, torch.ones_like(tokens) if self.sentence_avg else tokens),
        ):
            sums[name] = values.new_zeros(routing_kinds.num_tasks("pair", num_langs)).index_add_(0, pair_id, values)
        out = {}
        for pair in pairs:
            index = routing_kinds.pair_task_ids("pair", pair, langs)
            for prefix, values in sums.items():
                out[prefix + pair] = values[index]  # 0-dim tensors: fairseq sums and all-reduces them by name
        return out

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
        pairs = sorted({key[len(PAIR_LOSS):] for log in logging_outputs for key in log if key.startswith(PAIR_LOSS)})
        for pair in pairs:
            def total(prefix):
                return sum(float(log.get(prefix + pair, 0)) for log in logging_outputs)

            pair_size, pair_tokens = total(PAIR_SAMPLE_SIZE), total(PAIR_NTOKENS)
            if pair_size > 0:  # (a pair with no validation data logs nothing)
                metrics.log_scalar(f"loss_{pair}", total(PAIR_LOSS) / pair_size / math.log(2), pair_size, round=3)
            if pair_tokens > 0:
                metrics.log_scalar(f"nll_loss_{pair}", total(PAIR_NLL_LOSS) / pair_tokens / math.log(2), pair_tokens, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
