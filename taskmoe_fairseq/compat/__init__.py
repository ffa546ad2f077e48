"""What the plugin changes in fairseq, each change applied once per process and only where it is
needed (docs/design.md, "What the plugin changes in fairseq"):

* on plugin import (every path reads checkpoints): :mod:`taskmoe_fairseq.safe_loading`, torch's safe loader
  plus an explicit allow-list on every fairseq load path, whatever
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says; one-line refusals; and rank 0's broadcast copy of
  a checkpoint as plain containers (:mod:`.distributed`), which that loader accepts. In a
  process that ``torchrun`` started on a machine without CUDA also
  :func:`.distributed.let_torchrun_work_on_cpu` (fairseq infers its world size before any task
  exists);
* when the plugin's task trains (:func:`apply_for_training`, from its ``build_model`` in
  ``fairseq-train``, before fairseq builds the trainer):

  - :mod:`.model_identity`: training refuses a checkpoint of another model (``--langs`` order,
    MoE and size options) or a folder of expert shards with one line;
  - with several data-parallel ranks, :mod:`.distributed`: every DDP backend trains a model with
    experts (``find_unused_parameters``, DDP on CPU);
  - with ``--moe-expert-parallel-size`` > 1, :mod:`taskmoe_fairseq.expert_parallel.training` (expert
    parameters out of DDP, their gradients normalised, one gradient norm) and
    :mod:`taskmoe_fairseq.expert_parallel.fairseq_checkpoints` (sharded save, resume, checks);
* fairseq is imported quietly (below).

Raises nothing itself; each shim's errors are one-line :class:`~taskmoe_fairseq.errors.TaskMoeError`.
"""

import logging
import warnings

from taskmoe_fairseq import safe_loading
from taskmoe_fairseq.compat import distributed, model_identity


def _import_fairseq_quietly():
    """Import fairseq without its import-time nags (fairscale's FutureWarnings about
    ``torch.cuda.amp``, a tensorboardX hint), so ``import taskmoe_fairseq`` prints nothing.

    fairseq's speech tasks call ``logging.basicConfig(level=DEBUG)`` when imported; in a program
    that has not configured logging itself, that would turn on every library's debug output
    (matplotlib's font search, for one), so the root logger is put back as it was. The fairseq
    CLIs configure logging before they load a plugin and are not affected."""
    logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"fairscale")
        import fairseq.checkpoint_utils  # noqa: F401
        import fairseq.tasks  # noqa: F401
    if not handlers:
        root.setLevel(level)
        for handler in root.handlers[:]:
            root.removeHandler(handler)


logger = logging.getLogger("taskmoe_fairseq.compat")

#: the shim groups applied in this process, in order (each once)
APPLIED = []


def _apply_once(name: str, apply_group, replaced: str) -> None:
    """Run ``apply_group()`` unless ``name`` was applied in this process; log what it replaced."""
    if name in APPLIED:
        return
    apply_group()
    APPLIED.append(name)
    logger.info("taskmoe_fairseq: %s: replaced %s", name, replaced)


def _safe_loading():
    """The safe loader on fairseq's load paths, and rank 0's broadcast copy of a checkpoint made of
    plain containers: the safe loader on ``fairseq.distributed.utils`` refuses the ``DictConfig`` in
    fairseq's own copy, whatever the model, so the two go together."""
    safe_loading.apply()
    distributed.wrap_fairseq_broadcast_object()


def apply():
    """What importing the plugin changes in fairseq: the safe-loading policy (every path that
    reads a checkpoint needs it), and the CPU torchrun fix in a process torchrun started without CUDA."""
    _import_fairseq_quietly()
    _apply_once(
        "safe loading", _safe_loading,
        "fairseq.checkpoint_utils.torch, fairseq.distributed.utils.torch (load with weights_only=True), "
        "checkpoint_utils.load_checkpoint_to_cpu (one-line refusals), distributed.utils.broadcast_object "
        "(plain containers, which the safe loader accepts)",
    )
    if distributed.torchrun_without_cuda():
        _apply_once(
            "torchrun on CPU", distributed.let_torchrun_work_on_cpu,
            "fairseq.distributed.utils.infer_init_method, _infer_torch_distributed_launch_init",
        )


def _data_parallel_world_size() -> int:
    """The number of ranks of this process's ``torch.distributed`` group (1 when it has none):
    fairseq-train initialises it before it calls ``main``, so it is known when the task builds its model."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def apply_for_training(args) -> None:
    """The trainer's shims for a ``fairseq-train`` run of the plugin's task, before fairseq builds its
    ``Trainer`` (called from the task's ``build_model``, which runs after ``torch.distributed`` is set
    up and before the trainer). Each group is applied once per process and logged:

    * the resume checks (:mod:`.model_identity`): every training run;
    * the DDP settings (:mod:`.distributed`): when this process is one of several ranks;
    * expert parallelism (:mod:`taskmoe_fairseq.expert_parallel.training`,
      :mod:`taskmoe_fairseq.expert_parallel.fairseq_checkpoints`): when
      ``args.moe_expert_parallel_size`` > 1 (which needs several ranks).
    """
    expert_parallel_size = getattr(args, "moe_expert_parallel_size", 1) or 1
    if _data_parallel_world_size() > 1 or expert_parallel_size > 1:
        _apply_once(
            "data parallel", distributed.apply,
            "fairseq.models.DistributedFairseqModel (find_unused_parameters for a model with experts), "
            "distributed_fairseq_model.DistributedDataParallel (no device_ids on CPU)",
        )
    if expert_parallel_size > 1:
        from taskmoe_fairseq.expert_parallel import training

        _apply_once(
            "expert parallelism", training.apply,
            "fairseq.models.DistributedFairseqModel (expert parameters left out of DDP), "
            "FairseqOptimizer.all_reduce_grads, Trainer.clip_grad_norm",
        )
    # the resume checks go inside fairseq_checkpoints' Trainer.load_checkpoint: its checks of a
    # shard set come first
    _apply_once("resume checks", model_identity.apply, "fairseq.trainer.Trainer.load_checkpoint")
    if expert_parallel_size > 1:
        from taskmoe_fairseq.expert_parallel import fairseq_checkpoints

        _apply_once(
            "expert-parallel checkpoints", fairseq_checkpoints.apply,
            "Trainer.checkpoint_suffix, should_save_checkpoint_on_current_rank, save_checkpoint, load_checkpoint, "
            "fairseq.checkpoint_utils.PathManager, load_checkpoint_to_cpu (shards)",
        )
