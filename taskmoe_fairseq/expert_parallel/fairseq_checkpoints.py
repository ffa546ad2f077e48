"""Sharded checkpoints in fairseq's trainer with expert parallelism
(:mod:`taskmoe_fairseq.expert_parallel.sharded_checkpoint` has the layout).

* fairseq's checkpoint suffix becomes ``-rank-<l>`` and ranks ``0 .. P-1`` save: each its
  shard, rank 0 also the ``-shared.pt`` file (copied with shard 0 when fairseq copies
  ``checkpoint_best`` to ``checkpoint_last`` and the others);
* every rank loads the shared file merged with its own shard (``load_checkpoint_on_all_dp_ranks``),
  after checking the whole set: same P, every shard present, one run and one save;
* (a run without expert parallelism in a folder of shards stops instead of starting afresh:
  :mod:`.model_identity`).

Applied only to a run with ``--moe-expert-parallel-size`` > 1
(:func:`taskmoe_fairseq.compat.apply_for_training`).
"""

import functools
import logging
import os
import uuid

import torch.distributed as dist

from taskmoe_fairseq.expert_parallel import sharded_checkpoint
from taskmoe_fairseq.expert_parallel.training import expert_parallel_of, expert_parameter_names
from taskmoe_fairseq.errors import usage_error

logger = logging.getLogger("taskmoe_fairseq.compat")


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
        if ep is None:  # (a run without expert parallelism: model_identity refuses a folder of shards)
            return original_load(self, filename, *args, **kwargs)
        stem = sharded_checkpoint.stem_of(filename)
        run = None
        if stem is not None and (os.path.exists(filename) or os.path.exists(sharded_checkpoint.shared_path(stem))):
            metas = sharded_checkpoint.check_set(stem, expected_size=ep.size)
            run = metas[sharded_checkpoint.shared_path(stem)].get("run")
        elif os.path.exists(filename):
            raise usage_error(
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
    """Once per process: ``Trainer.checkpoint_suffix``, ``should_save_checkpoint_on_current_rank``,
    ``save_checkpoint``, ``load_checkpoint`` and ``checkpoint_utils.PathManager``,
    ``load_checkpoint_to_cpu`` handle expert shards as above (fairseq's own for a model
    without expert parallelism)."""
    _wrap_checkpointing()
