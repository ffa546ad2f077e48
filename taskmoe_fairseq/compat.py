"""Compatibility shims for fairseq on current torch, applied once on plugin import.

* Safe loading (torch >= 2.6 loads with ``weights_only=True``): fairseq
  checkpoints pickle their legacy config as ``argparse.Namespace`` and, with
  ``--eval-bleu``, a few numpy scalars. We allow-list exactly those globals;
  safe loading itself stays on.
* A checkpoint that still fails (unknown global, truncated or corrupt file)
  becomes one line that names the file and the fix instead of an unpickling
  traceback from inside fairseq.
* Safe loading holds whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: torch
  honours that variable only where the call site leaves ``weights_only`` unset,
  so the fairseq modules that ``torch.load`` checkpoints (``checkpoint_utils``:
  generate, interactive, the hub interface, train's restore and
  ``--finetune-from-model``; ``distributed.utils``: rank 0's broadcast copy)
  see a ``torch`` whose ``load`` always passes ``weights_only=True``.
* Data parallel: rank 0's broadcast copy of a checkpoint carries plain
  containers instead of an OmegaConf ``DictConfig`` (which the safe loader
  refuses), so resuming works without ``--load-checkpoint-on-all-dp-ranks``;
  ``pytorch_ddp`` on CPU gets no ``device_ids``; a model with experts gets
  ``find_unused_parameters=True`` under ``pytorch_ddp`` (an expert that no
  token of a batch chose has no gradient); ``torchrun`` works on CPU.
"""

import argparse
import collections
import functools
import logging
import os
import pickle
import re
import warnings
import zipfile

import numpy
import torch

from taskmoe_fairseq.errors import usage_error

logger = logging.getLogger(__name__)


def _numpy_globals():
    """The numpy globals that ``--eval-bleu`` checkpoints pickle (numpy 1.x and 2.x names)."""
    found = [numpy.ndarray, numpy.dtype]
    multiarray = getattr(numpy, "_core", None) or numpy.core
    found.append(multiarray.multiarray._reconstruct)
    dtypes = getattr(numpy, "dtypes", None)
    if dtypes is not None:
        found.append(dtypes.Int64DType)
    return found


SAFE_GLOBALS = [argparse.Namespace, *_numpy_globals()]


def describe_load_failure(path: str, error: BaseException) -> str:
    """One-line diagnosis of why ``torch.load(path)`` failed safe loading."""
    message = str(error)
    if not os.path.exists(path):
        return f"{path}: no such checkpoint file"
    if os.path.getsize(path) == 0 or not zipfile.is_zipfile(path):
        return (
            f"{path}: the checkpoint is truncated or corrupt (not a complete torch archive); "
            "re-copy it or re-save it"
        )
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if unsupported:
        ignored = (
            " (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; taskmoe_fairseq ignores it: safe loading stays on)"
            if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")
            else ""
        )
        return (
            f"{path}: refused by torch's safe loader: it holds {unsupported.group(1)}, which is not on "
            "taskmoe_fairseq.compat.SAFE_GLOBALS (unpickling it could run code); re-save it without "
            "that object, or, only if you made or trust the file, allow the type with "
            f"torch.serialization.add_safe_globals{ignored}"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return f"{path}: not a readable torch checkpoint ({first_line}); the file is corrupt or of another kind"


def safe_torch_load(path: str, mmap: bool = False):
    """``torch.load`` with the safe loader (allow-list above); bad files raise a one-line error.

    ``mmap``: map the file instead of reading it (tensors are paged in when used, so a
    checkpoint's optimizer state is never read)."""
    try:
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        with open(path, "rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch.load is all this does: any failure is the file's)
        raise usage_error(describe_load_failure(path, error)) from None


def _wrap_fairseq_checkpoint_loader():
    """Turn safe-load failures inside fairseq's loader into one-line errors."""
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "_taskmoe_wrapped", False):
        return

    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        try:
            return original(path, arg_overrides=arg_overrides, load_on_all_ranks=load_on_all_ranks)
        except Exception as error:  # noqa: BLE001
            # The safe loader refused it, or the file is not a complete torch archive (torch then
            # fails with EOFError, IndexError, RuntimeError...); other errors are not the file's.
            unreadable = os.path.isfile(path) and not zipfile.is_zipfile(path)
            if isinstance(error, pickle.UnpicklingError) or unreadable:
                raise usage_error(describe_load_failure(path, error)) from None
            raise

    load_checkpoint_to_cpu._taskmoe_wrapped = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


class _SafeLoadTorch:
    """``torch`` as the fairseq modules that read checkpoints see it: every attribute is torch's,
    except that ``load`` always passes ``weights_only=True``, so torch's
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (honoured only where ``weights_only`` is not passed)
    cannot turn safe loading off and run a code-carrying checkpoint."""

    _taskmoe_safe_load = True

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, *args, **kwargs):
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        return torch.load(f, map_location, *args, **kwargs)


# the fairseq modules that call torch.load on a translation user's paths
SAFE_LOAD_MODULES = ("fairseq.checkpoint_utils", "fairseq.distributed.utils")


def _give_fairseq_safe_torch_load():
    import importlib

    for name in SAFE_LOAD_MODULES:
        module = importlib.import_module(name)
        if not getattr(module.torch, "_taskmoe_safe_load", False):
            module.torch = _SafeLoadTorch()


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


def _wrap_fairseq_broadcast_object():
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
    torch.serialization.add_safe_globals([distributed_utils._TensorPlaceholder])

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
    return any(
        isinstance(getattr(module, "experts", None), torch.nn.ModuleList) and len(module.experts) > 1
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


def _let_torchrun_work_on_cpu():
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


def apply():
    _import_fairseq_quietly()
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    _give_fairseq_safe_torch_load()
    _wrap_fairseq_checkpoint_loader()
    _wrap_fairseq_broadcast_object()
    _wrap_fairseq_distributed_model()
    _let_torchrun_work_on_cpu()
