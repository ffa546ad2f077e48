"""Compatibility shims for fairseq on current torch, applied once on plugin import.

* Safe loading (torch >= 2.6 loads with ``weights_only=True``): fairseq
  checkpoints pickle their legacy config as ``argparse.Namespace`` and, with
  ``--eval-bleu``, a few numpy scalars. We allow-list exactly those globals;
  safe loading itself stays on.
* A checkpoint that still fails (unknown global, truncated or corrupt file)
  becomes one line that names the file and the fix instead of an unpickling
  traceback from inside fairseq.
"""

import argparse
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
        return (
            f"{path}: refused by torch's safe loader: it holds {unsupported.group(1)}, which is not on "
            "taskmoe_fairseq.compat.SAFE_GLOBALS; re-save it without that object, or, only if you "
            "trust the file, allow the type with torch.serialization.add_safe_globals"
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
    _wrap_fairseq_checkpoint_loader()
