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
* Checkpoints are sharded (:mod:`taskmoe_fairseq.sharded_checkpoint`): fairseq's checkpoint
  suffix becomes ``-rank-<l>`` and ranks ``0 .. P-1`` save (each its shard, rank 0 also the
  ``-shared.pt`` file, copied with it to ``checkpoint_best`` and the others); every rank
  loads its own shard merged with the shared file, after checking the whole set.
"""

import functools
import logging
import os
import uuid

import torch
import torch.distributed as dist

from taskmoe_fairseq import sharded_checkpoint

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


class _ShardAwarePathManager:
    """fairseq's ``PathManager`` as ``checkpoint_utils`` sees it, except that copying a shard-0
    file (``checkpoint_best-rank-0.pt`` -> ``checkpoint_last-rank-0.pt``) copies its shared file too."""

    _taskmoe_shard_aware = True

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def copy(self, src_path, dst_path, overwrite=False, **kwargs):
        copied = self._inner.copy(src_path, dst_path, overwrite=overwrite, **kwargs)
        match, target = sharded_checkpoint.SHARD_NAME.match(src_path), sharded_checkpoint.SHARD_NAME.match(dst_path)
        if copied and match and target and match.group("shard") == "0":
            shared = sharded_checkpoint.shared_path(match.group("stem"))
            if os.path.isfile(shared):
                self._inner.copy(shared, sharded_checkpoint.shared_path(target.group("stem")), overwrite=overwrite)
        return copied


def _save_shards(trainer, filename, extra_state, ep):
    from fairseq import utils

    model = trainer.get_model()
    state = utils.move_to_cpu(trainer.state_dict())
    state["extra_state"].update(extra_state)
    meta = {
        "size": ep.size,
        "num_experts": next(m.num_experts for m in model.modules() if getattr(m, "expert_parallel", None) is ep),
        "run": getattr(trainer, "_taskmoe_run", None),
        "num_updates": trainer.get_num_updates(),
        "shard": ep.index,
    }
    expert_ids = [index for index, param in enumerate(trainer.optimizer.params) if getattr(param, "expert", False)]
    shared, shard = sharded_checkpoint.split_state(state, expert_parameter_names(model), expert_ids, meta)
    match = sharded_checkpoint.SHARD_NAME.match(filename)
    logger.info("Saving expert shard %d to %s", ep.index, os.path.abspath(filename))
    sharded_checkpoint.save(shard, filename)
    if ep.index == 0 and trainer.data_parallel_rank == 0:
        sharded_checkpoint.save(shared, sharded_checkpoint.shared_path(match.group("stem")))
    return os.path.abspath(filename)


def _wrap_checkpointing():
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer
    from omegaconf import open_dict

    if not getattr(checkpoint_utils.PathManager, "_taskmoe_shard_aware", False):
        checkpoint_utils.PathManager = _ShardAwarePathManager(checkpoint_utils.PathManager)

    suffix_property = Trainer.checkpoint_suffix
    Trainer.checkpoint_suffix = property(
        lambda self: (
            suffix_property.fget(self) + f"-rank-{expert_parallel_of(self._model).index}"
            if expert_parallel_of(self._model) is not None
            else suffix_property.fget(self)
        )
    )
    should_save = Trainer.should_save_checkpoint_on_current_rank
    Trainer.should_save_checkpoint_on_current_rank = property(
        lambda self: (
            self.data_parallel_rank < expert_parallel_of(self._model).size
            if expert_parallel_of(self._model) is not None
            else should_save.fget(self)
        )
    )

    original_save = Trainer.save_checkpoint

    @functools.wraps(original_save)
    def save_checkpoint(self, filename, extra_state):
        ep = expert_parallel_of(self._model)
        if ep is None:
            return original_save(self, filename, extra_state)
        if not self.should_save_checkpoint_on_current_rank:
            return None
        return _save_shards(self, filename, extra_state, ep)

    Trainer.save_checkpoint = save_checkpoint

    original_load = Trainer.load_checkpoint

    @functools.wraps(original_load)
    def load_checkpoint(self, filename, *args, **kwargs):
        ep = expert_parallel_of(self._model)
        if ep is None:
            shared = sharded_checkpoint.shared_path(filename[: -len(".pt")]) if filename.endswith(".pt") else None
            if shared and not os.path.exists(filename) and os.path.isfile(shared):
                size = sharded_checkpoint.read_meta(shared)["size"]
                raise sharded_checkpoint.usage_error(
                    f"{os.path.dirname(filename) or '.'} holds an expert-parallel checkpoint ({os.path.basename(shared)}, "
                    f"P = {size}) and no {os.path.basename(filename)}: resume with --moe-expert-parallel-size {size}, "
                    "or consolidate it (python -m taskmoe_fairseq.consolidate) for single-process use"
                )
            return original_load(self, filename, *args, **kwargs)
        stem = sharded_checkpoint.stem_of(filename)
        run = None
        if stem is not None and (os.path.exists(filename) or os.path.exists(sharded_checkpoint.shared_path(stem))):
            metas = sharded_checkpoint.check_set(stem, expected_size=ep.size)
            run = metas[sharded_checkpoint.shared_path(stem)].get("run")
        elif os.path.exists(filename):
            raise sharded_checkpoint.usage_error(
                f"{filename}: --moe-expert-parallel-size {ep.size} resumes only from its own sharded checkpoints "
                "(<name>-shared.pt and <name>-rank-N.pt); starting it from an ordinary checkpoint is not supported"
            )
        with open_dict(self.cfg.checkpoint):
            self.cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True  # each rank reads its own shard
        extra_state = original_load(self, filename, *args, **kwargs)
        # one id per run, kept across resumes: shards of two runs are told apart
        chosen = [run or uuid.uuid4().hex]
        dist.broadcast_object_list(chosen, src=0)
        self._taskmoe_run = chosen[0]
        return extra_state

    Trainer.load_checkpoint = load_checkpoint

    original_to_cpu = checkpoint_utils.load_checkpoint_to_cpu

    @functools.wraps(original_to_cpu)
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        stem = sharded_checkpoint.stem_of(path)
        match = sharded_checkpoint.SHARD_NAME.match(path)
        if match is None or not os.path.isfile(sharded_checkpoint.shared_path(stem)):
            return original_to_cpu(path, arg_overrides=arg_overrides, load_on_all_ranks=load_on_all_ranks)
        state = original_to_cpu(sharded_checkpoint.shared_path(stem), arg_overrides, load_on_all_ranks)
        return sharded_checkpoint.merge_shard(state, sharded_checkpoint.safe_torch_load(path))

    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def apply():
    _wrap_trainer()
    _wrap_checkpointing()
