"""Data parallel the way fairseq users launch it, for models with experts. The DDP settings
(:func:`apply`) are applied when the plugin's task trains on several ranks; the broadcast
(:func:`wrap_fairseq_broadcast_object`) on import with the safe loader, which needs it for any
model; the torchrun fix (:func:`let_torchrun_work_on_cpu`) on import in a process torchrun started
without CUDA.

* Rank 0's broadcast copy of a checkpoint (resuming without
  ``--load-checkpoint-on-all-dp-ranks``) carries plain containers instead of an
  OmegaConf ``DictConfig``, which the other ranks' safe loader refuses.
* ``pytorch_ddp`` on CPU gets no ``device_ids``; a model with experts gets
  ``find_unused_parameters=True`` under ``pytorch_ddp`` (an expert that no token of a
  batch chose has no gradient).
* ``torchrun`` works on CPU (world size from torchrun, device 0 without CUDA).
"""

import collections
import functools
import logging
import os
import pickle
import re

import torch

from taskmoe_fairseq.errors import usage_error

logger = logging.getLogger("taskmoe_fairseq.compat")


def _plain(obj):
    """``obj`` with every OmegaConf config in it (dicts, lists, tuples walked) made plain containers."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True, enum_to_str=True)
    if isinstance(obj, dict):
        container = collections.OrderedDict if isinstance(obj, collections.OrderedDict) else dict
        return container((key, _plain(value)) for key, value in obj.items())
    if isinstance(obj, list):
        return [_plain(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(value) for value in obj)
    return obj


def wrap_fairseq_broadcast_object():
    """Rank 0 broadcasts its in-memory checkpoint when ranks resume without
    ``--load-checkpoint-on-all-dp-ranks``; the other ranks unpickle it with the safe loader.
    fairseq's copy holds the ``DictConfig`` that ``load_checkpoint_to_cpu`` made of the saved
    (plain) ``cfg``, which the safe loader refuses; send plain containers instead and make the
    ``cfg`` a ``DictConfig`` again on every rank, as fairseq's loader would."""
    from fairseq.distributed import utils as distributed_utils
    from omegaconf import OmegaConf

    original = distributed_utils.broadcast_object
    if getattr(original, "_taskmoe_wrapped", False):
        return

    @functools.wraps(original)
    def broadcast_object(obj, src_rank, group, dist_device=None):
        try:
            received = original(_plain(obj), src_rank, group, dist_device)
        except pickle.UnpicklingError as error:
            unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            held = unsupported.group(1) if unsupported else "an object it cannot check"
            raise usage_error(
                f"the object rank {src_rank} broadcast (a checkpoint when resuming) was refused by torch's "
                f"safe loader: it holds {held}; re-save the checkpoint without it, or pass "
                "--load-checkpoint-on-all-dp-ranks so every rank reads the file itself"
            ) from None
        if isinstance(received, dict) and isinstance(received.get("cfg"), dict):
            received["cfg"] = OmegaConf.create(received["cfg"], flags={"allow_objects": True})
        return received

    broadcast_object._taskmoe_wrapped = True
    distributed_utils.broadcast_object = broadcast_object


def has_experts(model) -> bool:
    """Whether ``model`` has a layer of several experts (some of which a batch may leave unused)."""
    from taskmoe_fairseq.modules.expert_feed_forward import StackedExperts

    return any(
        isinstance(getattr(module, "experts", None), (torch.nn.ModuleList, StackedExperts)) and len(module.experts) > 1
        for module in model.modules()
    )


def _wrap_fairseq_distributed_model():
    """fairseq's ``pytorch_ddp`` (alias ``c10d``) wraps the model in torch's DistributedDataParallel,
    which by default expects a gradient for every parameter in every step; an expert that no
    token of the local batch chose has none, and training dies at the next update ("Expected to
    have finished reduction in the prior iteration"). For a model with experts, turn on
    fairseq's ``find_unused_parameters`` (logged). On CPU, drop ``device_ids``, which torch's DDP
    rejects for a CPU module (fairseq passes ``[device_id]`` unconditionally)."""
    from fairseq import models
    from fairseq.models import distributed_fairseq_model
    from omegaconf import open_dict

    original = distributed_fairseq_model.DistributedFairseqModel
    if getattr(original, "_taskmoe_wrapped", False):
        return

    @functools.wraps(original)
    def DistributedFairseqModel(args, model, process_group, device):  # noqa: N802  (fairseq's name)
        if args.ddp_backend in ("c10d", "pytorch_ddp") and not args.find_unused_parameters and has_experts(model):
            logger.info(
                "taskmoe_fairseq: --ddp-backend %s with expert layers: setting find_unused_parameters=True "
                "(an expert that no token of a batch chose gets no gradient)", args.ddp_backend
            )
            with open_dict(args):
                args.find_unused_parameters = True
        return original(args, model, process_group, device)

    DistributedFairseqModel._taskmoe_wrapped = True
    models.DistributedFairseqModel = DistributedFairseqModel
    distributed_fairseq_model.DistributedFairseqModel = DistributedFairseqModel

    ddp_class = distributed_fairseq_model.DistributedDataParallel
    if getattr(ddp_class, "_taskmoe_cpu_aware", False):
        return

    class CpuAwareDistributedDataParallel(ddp_class):
        _taskmoe_cpu_aware = True

        def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
            if all(parameter.device.type == "cpu" for parameter in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids, output_device, *args, **kwargs)

    CpuAwareDistributedDataParallel.__name__ = ddp_class.__name__
    CpuAwareDistributedDataParallel.__qualname__ = ddp_class.__qualname__
    distributed_fairseq_model.DistributedDataParallel = CpuAwareDistributedDataParallel


def _torchrun_world_size():
    """``WORLD_SIZE`` when this process was started by torchrun (``torch.distributed.run``), else None."""
    if all(key in os.environ for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")):
        return int(os.environ["WORLD_SIZE"])
    return None


def torchrun_without_cuda() -> bool:
    """Whether torchrun started this process as one of several ranks on a machine without CUDA: the
    only case in which :func:`let_torchrun_work_on_cpu` changes anything."""
    world_size = _torchrun_world_size()
    return world_size is not None and world_size > 1 and torch.cuda.device_count() == 0


def let_torchrun_work_on_cpu():
    """fairseq reads torchrun's environment (``env://``), but on a machine without CUDA it never
    gets there: ``--distributed-world-size`` defaults to the CUDA device count (1 without one), and
    ``infer_init_method`` stops at a world size of 1; then it computes the device as
    ``rank % torch.cuda.device_count()`` (a ZeroDivisionError). With no CUDA device, take the
    world size from torchrun as fairseq means to and use device 0 (the CPU)."""
    from fairseq.distributed import utils as distributed_utils
    from omegaconf import open_dict

    original_infer = distributed_utils.infer_init_method
    if getattr(original_infer, "_taskmoe_wrapped", False):
        return
    original_launch_init = distributed_utils._infer_torch_distributed_launch_init

    @functools.wraps(original_infer)
    def infer_init_method(cfg, force_distributed=False):
        world_size = _torchrun_world_size()
        if (
            cfg.distributed_init_method is None
            and world_size is not None
            and world_size > 1
            and cfg.distributed_world_size == 1
            and torch.cuda.device_count() == 0
        ):
            with open_dict(cfg):
                cfg.distributed_world_size = world_size
        return original_infer(cfg, force_distributed)

    @functools.wraps(original_launch_init)
    def _infer_torch_distributed_launch_init(cfg):
        if torch.cuda.device_count() > 0:
            return original_launch_init(cfg)
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = 0
        cfg.distributed_no_spawn = True

    infer_init_method._taskmoe_wrapped = True
    distributed_utils.infer_init_method = infer_init_method
    distributed_utils._infer_torch_distributed_launch_init = _infer_torch_distributed_launch_init


def apply():
    """The DDP settings (once per process; :func:`taskmoe_fairseq.compat.apply_for_training`)."""
    _wrap_fairseq_distributed_model()
