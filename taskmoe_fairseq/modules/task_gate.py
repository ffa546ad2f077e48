"""Task-level gate, ``G = GATE(task_id)`` (Kudugunta et al., 2021, section 2).

The gate is a learned table of ``[num_tasks, E]`` logits: it never sees the
tokens, so every token of a task uses the same k experts with the same weights
and nothing is dropped. That is what lets a task-routed layer be extracted to
just those k experts (:meth:`MoeFeedForward.extract`).
"""

import torch
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.modules.float32_params import Float32Params, autocast_off
from taskmoe_fairseq.modules.static_gate import StaticTaskGate
from taskmoe_fairseq.modules.routing_decision import (
    RoutingDecision,
    expert_load,
    load_balancing_loss,
    top_k_weights,
)

STATIC_INIT_MARGIN = 3.0  # logit of a task's static experts over the rest at a static warm start


class TaskGate(Float32Params, nn.Module):
    """``task_logits``: float32 ``[num_tasks, E]`` (kept float32 in fp16/bf16 models; the gate
    computes in float32, with autocast off: :func:`autocast_off`).

    ``renormalize`` (``--moe-task-gate-weights top-k``, the default): the k weights are the top-k
    probabilities renormalised to sum to 1, as in GShard. Then a weight depends only on the
    difference of the k chosen logits, so the cross-entropy never reaches the other ``E - k``
    logits: which experts a task uses is left to the initialisation and the balance loss, and the
    gates stay soft (docs/quickstart/gates.md). ``False`` (``softmax``): the k weights are the
    softmax probabilities themselves (they sum to less than 1, as with Switch's k = 1), so the
    cross-entropy's gradient reaches every expert's logit through the softmax's normaliser.

    ``init`` (``--moe-task-gate-init``): ``random`` (the default) draws the logits from N(0, 1);
    ``static`` warm-starts the gate from the static baseline's assignment
    (:class:`StaticTaskGate`: task ``t`` on experts ``(t * k + j) mod E``), those k logits
    :data:`STATIC_INIT_MARGIN` above the others (0), so every task starts on its static experts
    (probability 0.44 each for E = 8, k = 2) and the gate may still move away from them.

    ``old_tasks`` (bool ``[num_tasks]``) and ``old_experts`` (an int below ``num_experts``): a gate that
    languages were added to (``--moe-add-langs``, :mod:`taskmoe_fairseq.models.adding`). An old task's
    probabilities are the softmax over its first ``old_experts`` logits only, the new experts' set to 0:
    the same float operations on the same values as before the experts were added, so an old task
    selects the same experts with bit-identical weights and never a new expert.
    """

    per_sentence = True

    def __init__(self, num_tasks: int, num_experts: int, top_k: int = 2, renormalize: bool = True, init: str = "random",
                 old_tasks=None, old_experts=None):
        super().__init__()
        self.renormalize = renormalize
        if init == "static":
            logits = torch.zeros(num_tasks, num_experts)
            _, index = StaticTaskGate(num_experts, top_k).route_tasks(torch.arange(num_tasks))
            logits.scatter_(1, index, STATIC_INIT_MARGIN)
        elif init == "random":
            # Random, not zero, logits: with equal logits every task would start on the same experts.
            logits = torch.randn(num_tasks, num_experts)
        else:
            raise ValueError(f"task gate init must be 'random' or 'static', not {init!r}")
        self.task_logits = nn.Parameter(logits)
        self.num_experts = num_experts
        self.top_k = top_k
        self.old_experts = old_experts if old_experts is not None and old_experts < num_experts else None
        # derived from the model's args, never stored in a checkpoint; a tuple, not a buffer, so that a model
        # assembled on the meta device (the server's, extraction's) has it too
        self.old_tasks = None if old_tasks is None else tuple(bool(old) for old in old_tasks)

    def route_tasks(self, tasks: Tensor):
        """Float32 probabilities ``[T, E]``, top-k weights ``[T, K]`` and experts ``[T, K]`` of task ids ``[T]``."""
        with autocast_off(self.task_logits.device):
            logits = self.task_logits.float()[tasks]
            probs = logits.softmax(dim=-1)
            if self.old_experts is not None and self.old_tasks is not None:
                old = torch.nn.functional.pad(logits[:, : self.old_experts].softmax(dim=-1),
                                              (0, self.num_experts - self.old_experts))
                is_old = torch.tensor(self.old_tasks, device=tasks.device)[tasks]
                probs = torch.where(is_old[:, None], old, probs)
            if self.renormalize:
                weights, index = top_k_weights(probs, self.top_k)
            else:
                weights, index = probs.topk(self.top_k, dim=-1)
        return probs, weights, index

    def forward(self, task_ids: Tensor, sentence_tokens: Tensor) -> RoutingDecision:
        """``task_ids``: LongTensor ``[B]``; ``sentence_tokens``: float ``[B]``; returns ``[B, K]`` rows
        (float32 weights and losses, autocast off)."""
        # Once per task of the table (a few dozen rows), not per token or sentence; a task absent
        # from the batch stands for 0 tokens, so it adds nothing to the loss or the load. No
        # torch.unique: nothing is read back from the device.
        num_tasks = self.task_logits.size(0)
        with autocast_off(self.task_logits.device):
            probs, weights, index = self.route_tasks(torch.arange(num_tasks, device=task_ids.device))
            task_tokens = sentence_tokens.new_zeros(num_tasks).index_add_(0, task_ids, sentence_tokens)
            return RoutingDecision(
                expert_index=index[task_ids],
                expert_weight=weights[task_ids],
                per_sentence=True,
                gate_loss=load_balancing_loss(probs, index[:, 0], task_tokens),
                expert_load=expert_load(index, weights, self.num_experts, task_tokens),
                dropped_share=probs.new_zeros(()),
            )
