"""fairseq's trainer with expert parallelism (``--moe-expert-parallel-size P > 1``).

Expert parameters (``param.expert``, see :mod:`taskmoe_fairseq.expert_parallel.dispatch`)
differ per rank, so:

* DDP leaves them alone: ``pytorch_ddp`` is told to ignore them
  (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``: neither
  broadcast at start nor all-reduced); fairseq's ``legacy_ddp`` already skips
  parameters with an ``expert`` attribute.
* Their gradients are normalised like the others'. fairseq's trainer multiplies every
  gradient by ``W / sample_size`` after DDP has averaged the shared ones (``sum / W``).
  A local expert's gradient already sums the tokens of its whole expert-parallel group
  (the all-to-all's backward brings them); after summing over the shard's replicas
  (ranks ``l, l + P, ...``, when W > P) it is divided by W, so it ends as
  ``sum over all tokens / sample_size``, as in data-parallel training.
* The gradient norm (logged, clipped, compared across ranks) counts every expert once:
  ``sqrt(|shared|^2 + sum over the group of |local experts|^2)``, the same on every rank.

Checkpoints: :mod:`.expert_parallel_checkpoints`. Applied only to a run with expert
parallelism (:func:`taskmoe_fairseq.compat.apply_for_training`).
"""

import functools
import logging

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

logger = logging.getLogger("taskmoe_fairseq.compat")


def expert_parallel_of(model):
    """The :class:`ExpertParallel` of a (wrapped) model, or None."""
    cached = getattr(model, "_taskmoe_expert_parallel", False)
    if cached is not False:
        return cached
    found = None
    for module in model.modules():
        found = getattr(module, "expert_parallel", None)
        if found is not None:
            break
    try:
        model._taskmoe_expert_parallel = found
    except AttributeError:
        pass
    return found


def expert_parameter_names(model):
    return [name for name, param in model.named_parameters() if getattr(param, "expert", False)]


#: elements per coalesced all-reduce of expert gradients (fairseq's LegacyDistributedDataParallel
#: buffer size: a bounded extra copy of the gradients)
BUCKET_ELEMENTS = 2 ** 28


def _buckets(grads):
    """``grads`` in order, cut into lists of one device and dtype and at most
    :data:`BUCKET_ELEMENTS` elements (a larger tensor is a bucket of its own)."""
    bucket, size = [], 0
    for grad in grads:
        if bucket and (size + grad.numel() > BUCKET_ELEMENTS or (grad.device, grad.dtype) != (bucket[0].device, bucket[0].dtype)):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        yield bucket


def reduce_expert_gradients(model, ep):
    """After DDP's reduction: sum each expert gradient over the shard's replicas and divide by W.

    The replicas' sums are coalesced as fairseq's ``legacy_ddp`` coalesces its all-reduce: the
    gradients are copied into one flat buffer per bucket (``torch._utils._flatten_dense_tensors``),
    all-reduced once over ``ep.replica_group``, divided by W and copied back; so one collective
    per :data:`BUCKET_ELEMENTS` elements, not one per parameter. A parameter no token reached
    here gets a zero gradient to take part. Without replicas (W == P) each gradient is divided only."""
    params = [param for param in model.parameters() if getattr(param, "expert", False) and param.requires_grad]
    if ep.replica_group is None:
        for param in params:
            if param.grad is not None:
                param.grad.div_(ep.world_size)
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for bucket in _buckets([param.grad for param in params]):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=ep.replica_group)
        flat.div_(ep.world_size)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)


def _sum_of_squares(grads, zero):
    """``sum_i |g_i|^2`` in float32 (one ``torch._foreach_norm`` over the list)."""
    if not grads:
        return zero
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2).sum()


def clip_grad_norm(params, max_norm: float, ep):
    """fairseq's ``utils.clip_grad_norm_`` (same clip coefficient) with the norm over every
    expert of the group, as one process holding all of them would compute it. Returns it
    (float32 scalar). The per-tensor norms are one ``torch._foreach_norm`` per list (as
    ``torch.nn.utils.clip_grad_norm_`` computes them), the group's expert part one all-reduce."""
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad.detach() for p in with_grad]
    shared = [g for p, g in zip(with_grad, grads) if not getattr(p, "expert", False)]
    local = [g for p, g in zip(with_grad, grads) if getattr(p, "expert", False)]
    zero = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
    shared_sq = _sum_of_squares(shared, zero)
    experts_sq = _sum_of_squares(local, zero).reshape(1)
    dist.all_reduce(experts_sq, group=ep.group)
    total = (shared_sq + experts_sq[0]) ** 0.5
    if max_norm > 0:
        coefficient = (max_norm / (total + 1e-6)).clamp_(max=1)
        for g in grads:
            g.mul_(coefficient.to(g.dtype))
    return total


def _wrap_trainer():
    from fairseq import models
    from fairseq.optim import FairseqOptimizer
    from fairseq.trainer import Trainer

    original_ddp = models.DistributedFairseqModel

    @functools.wraps(original_ddp)
    def DistributedFairseqModel(args, model, process_group, device):  # noqa: N802  (fairseq's name)
        if expert_parallel_of(model) is not None:
            names = expert_parameter_names(model)
            logger.info("taskmoe_fairseq: expert parallelism: %d expert parameters are left out of DDP", len(names))
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        return original_ddp(args, model, process_group, device)

    models.DistributedFairseqModel = DistributedFairseqModel

    original_all_reduce = FairseqOptimizer.all_reduce_grads

    @functools.wraps(original_all_reduce)
    def all_reduce_grads(self, module):
        original_all_reduce(self, module)
        ep = expert_parallel_of(module)
        if ep is not None:
            reduce_expert_gradients(module, ep)

    FairseqOptimizer.all_reduce_grads = all_reduce_grads

    original_clip = Trainer.clip_grad_norm

    @functools.wraps(original_clip)
    def trainer_clip_grad_norm(self, max_norm):
        ep = expert_parallel_of(self.model)
        if ep is None:
            return original_clip(self, max_norm)
        return clip_grad_norm(list(self.optimizer.params), max_norm, ep)

    Trainer.clip_grad_norm = trainer_clip_grad_norm


def apply():
    """Once per process (:func:`taskmoe_fairseq.compat.apply_for_training`, a run with
    ``--moe-expert-parallel-size`` > 1): ``models.DistributedFairseqModel``,
    ``FairseqOptimizer.all_reduce_grads`` and ``Trainer.clip_grad_norm`` act on expert parameters
    as above, and as fairseq's for a model without expert parallelism."""
    _wrap_trainer()
