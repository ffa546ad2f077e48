"""The model's routing step: every per-sentence decision of both sides, once per forward.

Kudugunta et al. (2021), section 2: a task gate ``G = GATE(task_id)`` and a
sentence gate are functions of the sentence, not of the token, so their
decisions are fixed for a sentence. The router takes them once, in the
encoder's forward, before its first layer (the decoder's sentence routing,
which gates on the encoder output, right after the last one), and the
decisions travel as data: to the encoder layers as forward arguments, to the
decoder in ``encoder_out`` (``moe_decoder_expert_index`` /
``moe_decoder_expert_weight`` / ``moe_decoder_expert_sets``, reordered with the
beams like the language ids). Beam search therefore runs no gate and asks the
device nothing about routing at any decoding step.

Gates (float32 whatever the model's dtype) live here, one per routed layer,
named ``<side>_<index>`` (``encoder.moe_router.gates.decoder_1.task_logits``):

* task routing (source / target / pair): :class:`TaskGate` on the task id;
* static routing: :class:`StaticTaskGate` (no parameters);
* sentence routing: :class:`SentenceTopKGate` on the mean of the sentence's
  non-pad token embeddings (encoder; ``embed_scale`` applied, no positions) or
  of the encoder output (decoder, so no position sees future target tokens).

In an extracted model the task-routed side has no gates: its layers hold the
pair's experts. The router then only checks that each batch asks for a pair
with the same task ids as the extracted one, and raises :class:`TaskMoeError`
otherwise, on every path (fairseq-generate, fairseq-interactive, hub).
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models import adding
from taskmoe_fairseq.models.moe_options import SIDES, added_experts, is_extracted, moe_layer_indices, routed_layers
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.routing_decision import ExpertSets, MoeAux
from taskmoe_fairseq.modules.sentence_gate import SentenceTopKGate
from taskmoe_fairseq.modules.static_gate import StaticTaskGate
from taskmoe_fairseq.modules.task_gate import TaskGate

# layer name -> (expert_index [B, K], expert_weight [B, K], their distinct expert sets)
Routing = Dict[str, Tuple[Tensor, Tensor, ExpertSets]]


def masked_mean(x: Tensor, padding_mask: Optional[Tensor], time_major: bool = True) -> Tensor:
    """Mean over time of ``x`` (``[T, B, C]``, or ``[B, T, C]`` if not ``time_major``)
    ignoring pads (``padding_mask`` ``[B, T]``, True = pad); returns ``[B, C]``."""
    if not time_major:
        x = x.transpose(0, 1)
    if padding_mask is None:
        return x.mean(dim=0)
    keep = (~padding_mask).t().unsqueeze(-1).type_as(x)
    return (x * keep).sum(dim=0) / keep.sum(dim=0).clamp_min(1.0)


#: where the router's parameters sit in a model's state dict (the encoder holds it)
ROUTER_PREFIX = "encoder.moe_router."


def _gate_name(side: str, index: int) -> str:
    return f"{side}_{index}"


def gate_key_prefix(side: str, index: int) -> str:
    """State-dict prefix of layer ``index`` of ``side``'s gate: ``encoder.moe_router.gates.decoder_1.``."""
    return f"{ROUTER_PREFIX}gates.{_gate_name(side, index)}."


class MoeRouter(nn.Module):
    """Built from the model's config; ``langs`` is the model's language list."""

    def __init__(self, cfg, embed_dim: int, langs: List[str]):
        super().__init__()
        self.langs = list(langs)
        num_experts, top_k = cfg.moe_expert_count, cfg.moe_top_k
        self.layers = {side: routed_layers(cfg, side) for side in SIDES}
        self.gates = nn.ModuleDict()
        for side in SIDES:
            for index, routing in self.layers[side]:
                key = routing_kinds.task_key(routing)
                if routing == routing_kinds.SENTENCE:
                    gate = SentenceTopKGate(embed_dim, num_experts, top_k)
                elif routing_kinds.is_static(routing):
                    gate = StaticTaskGate(num_experts, top_k)
                else:
                    # checkpoints from before the option have no attribute: GShard's renormalised weights
                    renormalize = getattr(cfg, "moe_task_gate_weights", None) in (None, "top-k")
                    added = added_experts(cfg, side)
                    gate = TaskGate(routing_kinds.num_tasks(key, len(self.langs)), num_experts + added, top_k, renormalize,
                                    init=getattr(cfg, "moe_task_gate_init", None) or "random",
                                    old_tasks=adding.old_task_mask(cfg, key, self.langs), old_experts=num_experts)
                self.gates[_gate_name(side, index)] = gate
        # extracted model: (side, task key, task id) that every batch must match
        self.extracted_pair = getattr(cfg, "moe_extracted_lang_pair", None)
        self.extracted_tasks = []
        if self.extracted_pair:
            for side in SIDES:
                if is_extracted(cfg, side) and moe_layer_indices(cfg, side):
                    key = routing_kinds.task_key(getattr(cfg, f"{side}_moe_routing"))
                    self.extracted_tasks.append((side, key, routing_kinds.pair_task_ids(key, self.extracted_pair, self.langs)))

    def needs_language_ids(self) -> bool:
        return bool(self.extracted_tasks) or any(
            routing_kinds.task_key(routing) for side in SIDES for _, routing in self.layers[side]
        )

    def routes_by_pair(self) -> bool:
        """Whether a (not extracted) layer's gate is a function of the language pair."""
        return any(routing_kinds.task_key(routing) == "pair" for side in SIDES for _, routing in self.layers[side])

    def needs_summary(self, side: str) -> bool:
        return any(routing == routing_kinds.SENTENCE for _, routing in self.layers[side])

    def route(
        self,
        side: str,
        src_lang_id: Optional[Tensor],
        tgt_lang_id: Optional[Tensor],
        summary: Callable[[], Tensor],
        sentence_tokens: Tensor,
    ) -> Tuple[Routing, List[MoeAux]]:
        """Decisions of ``side``'s routed layers for a batch of ``B`` sentences.

        Args:
            src_lang_id, tgt_lang_id: LongTensor ``[B]`` (indices into ``langs``).
            summary: returns the ``[B, C]`` sentence summary (called only for sentence routing).
            sentence_tokens: float ``[B]`` tokens each sentence stands for (weights the gate loss).
        Returns:
            layer name -> ``(expert_index [B, K] long, expert_weight [B, K] float32, ExpertSets)``
            (the sets found here, once per batch, so that no decoding step asks the device), and
            one :class:`MoeAux` per routed layer (gate loss, expert load).
        Raises:
            TaskMoeError: a task routing without language ids.
        """
        routing, aux = {}, []
        cached_summary = None
        for index, kind in self.layers[side]:
            gate = self.gates[_gate_name(side, index)]
            if kind == routing_kinds.SENTENCE:
                cached_summary = summary() if cached_summary is None else cached_summary
                decision = gate(cached_summary, sentence_tokens)
            else:
                tasks = self._task_ids(kind, src_lang_id, tgt_lang_id)
                decision = gate(tasks, sentence_tokens)
            name = routing_kinds.layer_name(side, index)
            routing[name] = (decision.expert_index, decision.expert_weight, ExpertSets.of(decision.expert_index))
            aux.append(decision.aux(name))
        return routing, aux

    def check_pair(self, src_lang_id: Optional[Tensor], tgt_lang_id: Optional[Tensor]):
        """In an extracted model: raise unless every sentence's task ids are the extracted pair's."""
        if not self.extracted_tasks:
            return
        if src_lang_id is None or tgt_lang_id is None:
            raise usage_error(
                f"this is the {self.extracted_pair} sub-network; it needs each sentence's languages to check the "
                "pair: run it with --task multilingual_translation_taskmoe"
            )
        for side, key, task in self.extracted_tasks:
            tasks = routing_kinds.task_ids(key, src_lang_id, tgt_lang_id, len(self.langs))
            if bool((tasks != task).any()):
                bad = int(((tasks != task).nonzero()[0]).item())
                pair = f"{self.langs[int(src_lang_id[bad])]}-{self.langs[int(tgt_lang_id[bad])]}"
                raise usage_error(
                    f"this checkpoint is the {self.extracted_pair} sub-network; it cannot translate {pair} "
                    f"(its {side} experts were chosen for {key} {self._task_label(key, task)}): extract "
                    f"{pair} from the full checkpoint"
                )

    def decide_pair(self, side: str, index: int, pair: str) -> Tuple[Tensor, Tensor]:
        """Experts ``[K]`` and float32 weights ``[K]`` the layer's gate gives ``pair``
        (the gate code the model runs)."""
        routing = dict(self.layers[side])[index]
        key = routing_kinds.task_key(routing)
        task = torch.tensor([routing_kinds.pair_task_ids(key, pair, self.langs)])
        gate = self.gates[_gate_name(side, index)]
        with torch.no_grad():
            if isinstance(gate, StaticTaskGate):
                weights, experts = gate.route_tasks(task)
            else:
                _, weights, experts = gate.route_tasks(task.to(gate.task_logits.device))
        return experts[0].cpu(), weights[0].float().cpu()

    def gate_parameters(self, side: str, index: int) -> int:
        return sum(p.numel() for p in self.gates[_gate_name(side, index)].parameters())

    def _task_ids(self, routing, src_lang_id, tgt_lang_id):
        if src_lang_id is None or tgt_lang_id is None:
            raise usage_error(
                f"'{routing}' routing needs each sentence's languages, but the batch has none: "
                "run with --task multilingual_translation_taskmoe"
            )
        return routing_kinds.task_ids(routing_kinds.task_key(routing), src_lang_id, tgt_lang_id, len(self.langs))

    def _task_label(self, key, task):
        if key == "pair":
            return f"{self.langs[task // len(self.langs)]}-{self.langs[task % len(self.langs)]}"
        return self.langs[task]
