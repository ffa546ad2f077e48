"""Writing files so that a reader never sees half of one: temporary file in the
target's folder, fsync, rename (the convention of fairseq's
``checkpoint_utils.torch_persistent_save``, which writes a ``.tmp`` and moves it)."""

import os
import tempfile
from typing import Callable, Union

from taskmoe_fairseq.errors import usage_error


def atomic_write(path: str, data: Union[bytes, Callable]):
    """Write ``data`` (bytes, or a function that writes to a binary stream) to ``path``.

    The file appears complete or not at all, with the usual mode (umask applied).

    Raises:
        TaskMoeError: the folder cannot be created or written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise usage_error(f"cannot write to {folder} ({error.strerror}); choose a writable output folder") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            if callable(data):
                data(stream)
            else:
                stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # the rename itself survives a crash once the folder is synced
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass
