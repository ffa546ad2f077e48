"""fairseq's trainer with expert parallelism (``--moe-expert-parallel-size P > 1``).

Expert parameters (``param.expert``, see :mod:`taskmoe_fairseq.modules.expert_parallel`)
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

Checkpoints: :mod:`.expert_parallel_checkpoints`.
"""

import functools
import logging

import torch
import torch.distributed as dist

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


def reduce_expert_gradients(model, ep):
    """After DDP's reduction: sum each expert gradient over the shard's replicas and divide by W."""
    params = [param for param in model.parameters() if getattr(param, "expert", False) and param.requires_grad]
    if ep.replica_group is not None:
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=ep.replica_group)
    for param in params:
        if param.grad is not None:
            param.grad.div_(ep.world_size)


def clip_grad_norm(params, max_norm: float, ep):
    """fairseq's ``utils.clip_grad_norm_`` (same clip coefficient) with the norm over every
    expert of the group, as one process holding all of them would compute it. Returns it."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    shared = [g for p, g in zip([p for p in params if p.grad is not None], grads) if not getattr(p, "expert", False)]
    local = [g for p, g in zip([p for p in params if p.grad is not None], grads) if getattr(p, "expert", False)]
    zero = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
    shared_sq = sum((g.float().norm() ** 2 for g in shared), zero)
    experts_sq = sum((g.float().norm() ** 2 for g in local), zero).reshape(1)
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

    if getattr(Trainer, "_taskmoe_expert_parallel", False):
        return
    Trainer._taskmoe_expert_parallel = True

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
    _wrap_trainer()
