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
* Every load first checks each tensor record's size against its storage
  (:func:`check_tensor_records`): a memory-mapped load (``mmap=True``) reads a storage as the
  bytes at its record's offset, so a record cut short while the zip's directory stayed
  consistent would silently lend it the following records' bytes (NaN or 1e24 weights).
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


def missing_checkpoint(path: str, what: str = "checkpoint file") -> str:
    """``PATH: no such <what>``, and where an expert-parallel run saved ``PATH`` as
    ``<name>-shared.pt`` + ``<name>-rank-N.pt`` instead, which file to pass or how to join them."""
    stem = path[:-3] if path.endswith(".pt") else None
    if stem and os.path.isfile(stem + "-shared.pt"):
        return (f"{path}: no such {what}; expert-parallel training saved it as {stem}-shared.pt with its "
                "-rank-N.pt shards: extract reads that file, other commands need it consolidated "
                f"(python -m taskmoe_fairseq.consolidate --checkpoint-dir {os.path.dirname(path) or '.'} "
                f"--name {os.path.basename(stem)} --output full.pt)")
    return f"{path}: no such {what}"


def describe_load_failure(path: str, error: BaseException) -> str:
    """One-line diagnosis of why ``torch.load(path)`` failed safe loading."""
    message = str(error)
    if not os.path.exists(path):
        return missing_checkpoint(path)
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
            "taskmoe_fairseq.safe_loading.SAFE_GLOBALS (unpickling it could run code); re-save it without "
            "that object, or, only if you made or trust the file, allow the type with "
            f"torch.serialization.add_safe_globals{ignored}"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return f"{path}: not a readable torch checkpoint ({first_line}); the file is corrupt or of another kind"


# element sizes of the storage types torch's zip format names in a persistent id
# (``('storage', torch.<Type>Storage, key, location, numel)``, torch.serialization._save)
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
    "QUInt8Storage": torch.quint8, "QInt8Storage": torch.qint8, "QInt32Storage": torch.qint32,
    "QUInt4x2Storage": torch.quint4x2, "QUInt2x4Storage": torch.quint2x4, "UntypedStorage": torch.uint8,
}


class _Placeholder:
    """What every global of the pickle becomes while its storages are listed: nothing is imported or run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageLister(pickle.Unpickler):
    """Reads a checkpoint's ``data.pkl`` for its storages only: ``{key: bytes}`` in ``needed``."""

    def __init__(self, stream):
        super().__init__(stream)
        self.needed = {}
        self._classes = {}

    def find_class(self, module, name):
        if (module, name) not in self._classes:
            self._classes[(module, name)] = type(name, (_Placeholder,), {"_global": (module, name)})
        return self._classes[(module, name)]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, kind, key, _, numel = pid
            module, name = getattr(kind, "_global", (None, None))
            dtype = _STORAGE_DTYPES.get(name) if module == "torch" else None
            if dtype is not None and isinstance(numel, int):
                self.needed[str(key)] = max(self.needed.get(str(key), 0), numel * torch.empty((), dtype=dtype).element_size())
        return _Placeholder()


def _records_needed(archive: zipfile.ZipFile):
    """(record prefix, ``{key: bytes}``) of a torch zip archive; None where it is not one (torch.load reports that)."""
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") <= 1]
    if not pickles:
        return None
    try:
        with archive.open(pickles[0]) as stream:
            lister = _StorageLister(stream)
            lister.load()
    except Exception:  # noqa: BLE001  (a pickle torch cannot read either: torch.load names the failure)
        return None
    return pickles[0][: -len("data.pkl")], lister.needed


def check_tensor_records(source, name: str = None):
    """Refuse a torch zip checkpoint whose tensor record holds fewer bytes than its storage needs.

    ``source``: a path or a seekable binary file (its position is kept). Reads the zip's central
    directory and the ``data.pkl`` record (without importing or running anything it names: every
    global is a placeholder), then compares each ``data/<key>`` record's size with the storage's
    element count x element size, as torch's non-mapped reader does
    (``PyTorchStreamReader``: "record size ... does not match expected size") and its mapped one
    does not. Files that are not torch zip archives pass (``torch.load`` reports them).

    Raises:
        TaskMoeError: one line naming ``name`` (default: the path), the record and both sizes.
    """
    name = name or str(source)
    try:
        position = source.tell() if hasattr(source, "seek") else None
    except OSError:
        return  # a stream that cannot seek: torch.load reads it whole, and compares the sizes itself
    try:
        with zipfile.ZipFile(source) as archive:
            found = _records_needed(archive)
            if found is None:
                return
            prefix, needed = found
            sizes = {info.filename: info.file_size for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return
    finally:
        if position is not None:
            source.seek(position)
    for key in sorted(needed, key=lambda key: (len(key), key)):
        record = f"{prefix}data/{key}"
        have = sizes.get(record)
        if have is None or have < needed[key]:
            held = "is missing" if have is None else f"holds {have:,} bytes"
            raise usage_error(
                f"{name}: the checkpoint is truncated or corrupt: tensor record {record} {held}, its storage needs "
                f"{needed[key]:,}; re-copy it or re-save it"
            )
    check_record_checksums(source, name)


_CHECKSUMS_VERIFIED = set()  # (real path, inode, size, mtime, ctime) of files whose records all passed


def _file_identity(path: str):
    info = os.stat(path)
    return os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def check_record_checksums(source, name: str = None):
    """Refuse a torch zip checkpoint one of whose records does not match the CRC-32 its zip
    directory holds (torch writes one per record), or whose record header is damaged: a copy with a
    zeroed or overwritten range keeps every size, so :func:`check_tensor_records` alone passes it
    and torch would load the damaged bytes as weights. Reads every record once; a file that passed
    is remembered by its identity (path, inode, size, modification and change times), so a server
    reading one pair's experts at a time does not read it again.

    Raises:
        TaskMoeError: one line naming ``name`` (default: the path) and the record.
    """
    name = name or str(source)
    identity = _file_identity(source) if isinstance(source, (str, os.PathLike)) else None
    if identity is not None and identity in _CHECKSUMS_VERIFIED:
        return
    position = source.tell() if identity is None else None
    record = None
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                record = info.filename
                with archive.open(info) as member:  # zipfile compares the CRC-32 when the record is read to its end
                    while member.read(1 << 24):
                        pass
    except zipfile.BadZipFile as error:
        raise usage_error(f"{name}: the checkpoint is corrupt: record {record} fails its check ({error}); re-copy it or "
                          "re-save it") from None
    except (OSError, EOFError, ValueError):
        return  # not readable as a zip here: torch.load reports it
    finally:
        if position is not None:
            source.seek(position)
    if identity is not None:
        _CHECKSUMS_VERIFIED.add(identity)


def safe_torch_load(path: str, mmap: bool = False):
    """``torch.load`` with the safe loader (allow-list above); bad files raise a one-line error.

    ``mmap``: map the file instead of reading it (tensors are paged in when used, so a
    checkpoint's optimizer state is never read). Either way every tensor record's size is
    checked first (:func:`check_tensor_records`).

    Raises:
        TaskMoeError: missing, truncated (also one tensor record cut short), corrupt or unsafe file.
    """
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe would block the read forever
        raise usage_error(f"{path} is not a regular file (a folder, pipe or device); pass a checkpoint file")
    if os.path.isfile(path):
        check_tensor_records(path)
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
    cannot turn safe loading off and run a code-carrying checkpoint, and checks the tensor
    records' sizes first (:func:`check_tensor_records`)."""

    _taskmoe_safe_load = True

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            if os.path.isfile(f):
                check_tensor_records(os.fspath(f))
        elif hasattr(f, "seek") and hasattr(f, "read"):
            check_tensor_records(f, getattr(f, "name", None) or "the received checkpoint")
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
    from fairseq.distributed import utils as distributed_utils

    # fairseq's broadcast_object pickles a tensor as this placeholder (rank 0's checkpoint on resume)
    torch.serialization.add_safe_globals([*SAFE_GLOBALS, distributed_utils._TensorPlaceholder])
    _give_fairseq_safe_torch_load()
    _wrap_fairseq_checkpoint_loader()
