"""One expert: the Transformer's ReLU feed-forward block (GShard experts are plain FFNs); a
layer's experts stacked into one module (:class:`StackedExperts`); and the weighted sum of k
experts that MoE and extracted layers share."""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor


class ExpertFeedForward(nn.Module):
    """``fc2(dropout(act(fc1(x))))``: ``[..., C] -> [..., C]`` through width ``ffn_dim``.

    Parameter names match fairseq's ``TransformerEncoderLayer`` (``fc1``, ``fc2``)
    so a dense FFN and an expert read alike in a state dict.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str = "relu", activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation_fn = utils.get_activation_fn(activation=activation_fn)
        self.activation_dropout_module = FairseqDropout(activation_dropout, module_name=self.__class__.__name__)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(x))))


def combine_experts(x: Tensor, experts: List[Callable[[Tensor], Tensor]], weights: Tensor) -> Tensor:
    """``sum_k weights[..., k] * experts[k](x)`` in k order (the order extraction keeps).
    ``experts``: modules or :meth:`StackedExperts.expert_fns` callables (the same arithmetic).

    ``x``: ``[T, B, C]``; ``weights``: ``[B, K]`` per sentence or ``[K]`` for all. The sum is
    taken in ``x``'s dtype: under autocast (``--amp``) an expert returns float16/bfloat16 for a
    float32 ``x``, and a 0-dim weight (``[K]``) would not promote the product to float32 as a
    ``[B, K]`` one does, so the output is cast to ``x.dtype`` first (the full and the
    extracted layer then agree; fairseq's dense FFN likewise adds its output to the float32
    residual).
    """
    out = None
    for k, expert in enumerate(experts):
        weight = weights[..., k].to(x.dtype)
        y = expert(x).to(x.dtype) * (weight if weight.dim() == 0 else weight[None, :, None])
        out = y if out is None else out + y
    return out


#: one FFN's tensors in fairseq's order: ``(fc1.weight [F, C], fc1.bias [F], fc2.weight [C, F], fc2.bias [C])``
FfnTensors = Tuple[Tensor, Tensor, Tensor, Tensor]


def merge_experts(experts: Sequence[FfnTensors], weights: Tensor) -> FfnTensors:
    """The one FFN of width ``k * F`` equal to ``sum_j weights[j] * expert_j(x)`` for ReLU-like
    experts: ``fc1`` rows stacked, ``fc2`` columns scaled by ``weights[j]`` and stacked, ``fc2``
    biases summed with the weights (exact in real arithmetic; float rounding differs from the
    experts' weighted sum). ``weights``: float ``[k]``, cast to the experts' dtype. The one home of
    this arithmetic: ``--merge-experts`` (:class:`ExtractedFeedForward`) and the CTranslate2
    export's dense view (:mod:`taskmoe_fairseq.export.subnetwork`) both call it."""
    scale = [w.to(experts[0][2].dtype) for w in weights]
    return (
        torch.cat([fc1_weight for fc1_weight, _, _, _ in experts], dim=0),
        torch.cat([fc1_bias for _, fc1_bias, _, _ in experts], dim=0),
        torch.cat([w * fc2_weight for w, (_, _, fc2_weight, _) in zip(scale, experts)], dim=1),
        sum(w * fc2_bias for w, (_, _, _, fc2_bias) in zip(scale, experts)),
    )


def ffn_tensors(expert: ExpertFeedForward) -> FfnTensors:
    return expert.fc1.weight, expert.fc1.bias, expert.fc2.weight, expert.fc2.bias


#: how :meth:`StackedExperts.forward` computes a dispatched batch
COMPUTE_MODES = ("auto", "bmm", "loop")
#: ``auto`` on a CUDA (any non-CPU) device takes the padded ``bmm`` while its padding (E x the largest
#: count) is at most this many times the rows; on the CPU it always takes the loop, which was as fast
#: or faster in every setting measured (docs/benchmarks/stacked-experts.md)
BMM_PADDING_LIMIT = 2.5
#: the stacked parameters' names and the per-expert ``nn.Linear`` names they replace, in ``FfnTensors`` order
STACKED_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
EXPERT_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class StackedExperts(nn.Module):
    """A layer's E experts as four stacked parameters, computed together.

    ``fc1_weight [E, F, C]``, ``fc1_bias [E, F]``, ``fc2_weight [E, C, F]``, ``fc2_bias [E, C]``
    (``C`` = ``embed_dim``, ``F`` = ``ffn_dim``): slice ``e`` of each is exactly expert ``e``'s
    ``nn.Linear`` tensor (``weight`` is ``[out, in]``), so a slice is the fairseq layout with no
    transpose. Extraction, serving and the CTranslate2 export copy slices bit for bit, checkpoints
    of per-expert modules (``experts.{e}.fc1.weight``) convert by :func:`torch.stack` alone, and
    the batched product reads the transposed view (``bmm`` takes it without a copy). The other
    layout (``fc1 [E, C, F]``, ``fc2 [E, F, C]``, what ``x @ W`` reads directly) would make every
    slice a transpose of fairseq's tensor, and on this CPU it bought the padded ``bmm`` about 10%,
    not the 1.2-4x it lost to the loop (docs/benchmarks/stacked-experts.md).

    Three ways to run it:

    * :meth:`forward`: assignment rows sorted by expert (``counts[e]`` rows for expert ``e``), the
      token path's dispatch. ``compute`` ``"bmm"`` pads every expert's rows to the largest
      count (the capacity; an unused expert's rows are zeros) and runs both layers as one
      ``torch.baddbmm`` each over the whole stack, read in place (GShard's capacity-padded
      layout; MegaBlocks' and ScatterMoE's dropless grouped GEMMs avoid the padding on GPUs, and
      ``torch._grouped_mm`` has no CPU backward in torch 2.13); ``"loop"`` runs one ``F.linear``
      pair per used expert on its slice (the per-module computation this class replaces);
      ``"auto"`` (default) chooses per call (:meth:`choose_compute`).
    * :meth:`expert_fns`: each expert as a callable on any ``[..., C]`` (the per-sentence
      path, k experts for a group of sentences; bit-identical to an extracted expert).
    * :meth:`expert_module` ``(e)``: a detached copy of expert ``e`` as an :class:`ExpertFeedForward`
      (extraction's serving form keeps fairseq's per-expert modules).

    The loop takes its slices with one ``unbind`` per tensor, so its backward adds one stacked
    gradient per parameter (indexing ``fc1_weight[e]`` E times would add E full-size gradients).
    An expert no row reaches gets a zero gradient (with separate modules it got none, and fairseq's
    Adam skipped it in a single process; legacy DDP already filled such gradients with zeros), so
    Adam now moves it by its momentum there too.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int, activation_fn: str = "relu",
                 activation_dropout: float = 0.0):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.activation_fn_name = activation_fn
        self.activation_fn = utils.get_activation_fn(activation=activation_fn)
        self.activation_dropout_module = FairseqDropout(activation_dropout, module_name=self.__class__.__name__)
        self.compute = "auto"

    @classmethod
    def initialised(cls, embed_dim: int, ffn_dim: int, num_experts: int, keep: Optional[range] = None,
                    activation_fn: str = "relu", activation_dropout: float = 0.0) -> "StackedExperts":
        """The experts ``keep`` (default all) of ``num_experts`` initialised as separate
        :class:`ExpertFeedForward` modules would be: every expert in order from one random stream
        (``nn.Linear``'s initialisation), then only ``keep``'s stacked, so expert ``e`` starts
        equal whatever E's split into expert-parallel shards is."""
        keep = range(num_experts) if keep is None else keep
        kept = []
        for e in range(num_experts):
            expert = ExpertFeedForward(embed_dim, ffn_dim, activation_fn, activation_dropout)
            if e in keep:
                kept.append(ffn_tensors(expert))
        out = cls(embed_dim, ffn_dim, len(kept), activation_fn, activation_dropout)
        with torch.no_grad():
            for parameter, tensors in zip(out.stacked(), zip(*kept)):
                parameter.copy_(torch.stack(tensors))
        return out

    def __len__(self) -> int:
        return self.fc1_weight.size(0)

    def extra_repr(self) -> str:
        experts, ffn_dim, embed_dim = self.fc1_weight.shape
        return f"experts={experts}, embed_dim={embed_dim}, ffn_dim={ffn_dim}, compute={self.compute}"

    def stacked(self) -> FfnTensors:
        """The four stacked parameters in :data:`FfnTensors` order."""
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias

    def ffn(self, e: int) -> FfnTensors:
        """Expert ``e``'s tensors (views of the stack, in the autograd graph)."""
        return tuple(tensor[e] for tensor in self.stacked())

    def _run_ffn(self, x: Tensor, tensors: FfnTensors) -> Tensor:
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = tensors
        hidden = self.activation_dropout_module(self.activation_fn(F.linear(x, fc1_weight, fc1_bias)))
        return F.linear(hidden, fc2_weight, fc2_bias)

    def expert_fns(self) -> List[Callable[[Tensor], Tensor]]:
        """Every expert as a function ``[..., C] -> [..., C]`` (``ExpertFeedForward.forward``'s ops),
        from one ``unbind`` per stacked tensor (one backward node each, whatever the experts used)."""
        slices = list(zip(*(tensor.unbind(0) for tensor in self.stacked())))
        return [lambda x, tensors=tensors: self._run_ffn(x, tensors) for tensors in slices]

    def expert_module(self, e: int) -> ExpertFeedForward:
        """A copy of expert ``e`` as an :class:`ExpertFeedForward` (same dtype and device, detached)."""
        fc1_weight = self.fc1_weight
        with torch.device("meta"):
            module = ExpertFeedForward(fc1_weight.size(2), fc1_weight.size(1), self.activation_fn_name,
                                       self.activation_dropout_module.p)
        state = {name: tensor.detach().clone() for name, tensor in zip(EXPERT_NAMES, self.ffn(e))}
        nn.Module.load_state_dict(module, state, strict=True, assign=True)
        return module

    def forward(self, rows: Tensor, counts: Sequence[int], compute: Optional[str] = None) -> Tensor:
        """``rows``: ``[A, C]`` sorted by expert, ``counts``: ``E`` ints (rows of each expert, summing
        to ``A``); returns each row's expert output ``[A, C]`` in the order of ``rows``.
        ``compute``: one of :data:`COMPUTE_MODES` (default ``self.compute``).

        Raises:
            ValueError: ``counts`` of another length than E, or an unknown ``compute``.
        """
        if len(counts) != len(self):
            raise ValueError(f"counts has {len(counts)} entries for {len(self)} experts")
        mode = compute or self.compute
        if mode not in COMPUTE_MODES:
            raise ValueError(f"compute {mode!r}: choose one of {', '.join(COMPUTE_MODES)}")
        used = [e for e, count in enumerate(counts) if count > 0]
        if not used:
            return rows.new_zeros(rows.shape)
        if mode == "auto":
            mode = self.choose_compute(counts, rows.device.type)
        if mode == "loop":
            return self.loop_over_experts(rows, counts)
        return self.padded_bmm(rows, counts)

    @staticmethod
    def choose_compute(counts: Sequence[int], device_type: str = "cpu") -> str:
        """``auto``'s choice for rows per expert ``counts`` (``E`` ints) on ``device_type``: on the
        CPU ``"loop"`` (measured: the padded ``bmm`` was slower or equal at E = 8, 32, 128 in training
        and decoding); elsewhere ``"bmm"`` when more than one expert is used and the padded rows
        (E x largest count) are at most :data:`BMM_PADDING_LIMIT` times the rows, else ``"loop"``
        (not yet measured on a GPU: benchmarks/gpu_check.py)."""
        used, rows = sum(1 for count in counts if count > 0), sum(counts)
        if device_type == "cpu" or used < 2:
            return "loop"
        return "bmm" if len(counts) * max(counts) <= BMM_PADDING_LIMIT * rows else "loop"

    def loop_over_experts(self, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """One ``F.linear`` pair per used expert on its slice of ``rows`` (``[A, C]`` sorted by
        expert): the computation of E separate :class:`ExpertFeedForward` modules."""
        experts = self.expert_fns()
        outputs = [experts[e](chunk) for e, chunk in enumerate(rows.split(list(counts))) if counts[e] > 0]
        return torch.cat(outputs)

    def padded_bmm(self, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """Every expert's rows padded to the largest count ``K`` (``[E, K, C]``; zeros for an unused
        expert) and both layers as one ``torch.baddbmm`` each over the stack, read in place (selecting
        the used experts' weights would copy them, forward and backward); returns ``[A, C]``."""
        capacity, experts = max(counts), len(self)
        counts_tensor = torch.tensor(list(counts), device=rows.device)
        starts = torch.cumsum(counts_tensor, 0) - counts_tensor
        expert = torch.repeat_interleave(torch.arange(experts, device=rows.device), counts_tensor)
        slot = expert * capacity + torch.arange(rows.size(0), device=rows.device) - starts[expert]
        padded = rows.new_zeros(experts * capacity, rows.size(1)).index_copy(0, slot, rows).view(experts, capacity, -1)
        hidden = torch.baddbmm(self.fc1_bias.unsqueeze(1), padded, self.fc1_weight.transpose(1, 2))
        hidden = self.activation_dropout_module(self.activation_fn(hidden))
        out = torch.baddbmm(self.fc2_bias.unsqueeze(1), hidden, self.fc2_weight.transpose(1, 2))
        return out.reshape(experts * capacity, -1).index_select(0, slot)


def stack_expert_state(state_dict: dict, prefix: str) -> bool:
    """In place: per-expert keys ``{prefix}{e}.fc1.weight`` ... (``e`` = 0..n-1, the layout of
    separate :class:`ExpertFeedForward` modules, written before experts were stacked) become
    :class:`StackedExperts`' ``{prefix}fc1_weight [n, F, C]`` ...; ``prefix`` ends in
    ``experts.``. Returns whether anything was converted.

    Raises:
        ValueError: the per-expert keys do not number 0..n-1 for every tensor.
    """
    found = {}
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        index, _, name = key[len(prefix):].partition(".")
        if index.isdigit() and name in EXPERT_NAMES:
            found.setdefault(name, {})[int(index)] = state_dict.pop(key)
    if not found:
        return False
    count = len(found.get(EXPERT_NAMES[0], {}))
    for name in EXPERT_NAMES:
        tensors = found.get(name, {})
        if sorted(tensors) != list(range(count)):
            raise ValueError(f"{prefix}*.{name}: experts {sorted(tensors)}, expected 0..{count - 1}")
    for name, stacked_name in zip(EXPERT_NAMES, STACKED_NAMES):
        state_dict[prefix + stacked_name] = torch.stack([found[name][e] for e in range(count)])
    return True
