"""Safe loading of checkpoints on every fairseq load path (torch >= 2.6 loads with
``weights_only=True``).

* fairseq checkpoints pickle their legacy config as ``argparse.Namespace`` and, with
  ``--eval-bleu``, a few numpy scalars: exactly those globals are allow-listed.
* Safe loading holds whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: torch honours
  that variable only where the call site leaves ``weights_only`` unset, so the fairseq
  modules that ``torch.load`` checkpoints (``checkpoint_utils``: generate, interactive,
  the hub interface, train's restore and ``--finetune-from-model``;
  ``distributed.utils``: rank 0's broadcast copy) see a ``torch`` whose ``load`` always
  passes ``weights_only=True``.
* A checkpoint that still fails (unknown global, truncated or corrupt file) becomes one
  line that names the file and the fix instead of an unpickling traceback.
"""

import argparse
import functools
import os
import pickle
import re
import zipfile

import numpy
import torch

from taskmoe_fairseq.errors import usage_error


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


def apply():
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    _give_fairseq_safe_torch_load()
    _wrap_fairseq_checkpoint_loader()
