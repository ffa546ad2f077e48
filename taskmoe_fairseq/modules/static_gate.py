"""The paper's static baseline: experts assigned to tasks by a fixed rule."""

import torch
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.modules.routing_decision import RoutingDecision, expert_load


class StaticTaskGate(nn.Module):
    """Task ``t`` uses experts ``(t * k + j) mod E`` for ``j < k``, weight ``1 / k``
    each; no learned parameters and no gate loss."""

    per_sentence = True

    def __init__(self, num_experts: int, top_k: int = 2):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k

    def route_tasks(self, tasks: Tensor):
        """Weights ``[T, K]`` and experts ``[T, K]`` of task ids ``[T]``."""
        offsets = torch.arange(self.top_k, device=tasks.device)
        index = (tasks[:, None] * self.top_k + offsets) % self.num_experts
        weights = torch.full(index.shape, 1.0 / self.top_k, device=tasks.device)
        return weights, index

    def forward(self, task_ids: Tensor, sentence_tokens: Tensor) -> RoutingDecision:
        weights, index = self.route_tasks(task_ids)
        return RoutingDecision(
            expert_index=index,
            expert_weight=weights,
            per_sentence=True,
            gate_loss=weights.new_zeros(()),
            expert_load=expert_load(index, weights, self.num_experts, sentence_tokens),
            dropped_share=weights.new_zeros(()),
        )
