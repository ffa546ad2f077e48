"""Writing files so that a reader never sees half of one: temporary file in the
target's folder, fsync, rename, fsync of the folder (the convention of fairseq's
``checkpoint_utils.torch_persistent_save``, which writes a ``.tmp`` and moves it).

The one implementation in the tree: the plugin's commands, the data scripts under
``examples/data/`` and the benchmarks all write their outputs through it.
"""

import os
import shutil
import tempfile
from typing import Callable, Iterable, Union

from taskmoe_fairseq.errors import usage_error


def _fsync_folder(folder: str):
    """Make a rename inside ``folder`` survive a crash (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str, data: Union[bytes, Callable]):
    """Write ``data`` (bytes, or a function that writes to a binary stream) to ``path``.

    The file appears complete or not at all, with the usual mode (umask applied); on any
    failure the temporary file is removed and an existing ``path`` is left as it was.

    Raises:
        TaskMoeError: the folder cannot be created or written.
        OSError: writing, syncing or renaming failed (disk full, ...), re-raised after clean-up.
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
    _fsync_folder(folder)


def atomic_write_text(path: str, text: str):
    """Write ``text`` to ``path`` as UTF-8, atomically (see :func:`atomic_write`)."""
    atomic_write(path, text.encode("utf-8"))


def atomic_write_lines(path: str, lines: Iterable[str]):
    """Write one UTF-8 line per item (items hold no newline), atomically."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def atomic_copy(source: str, path: str):
    """Copy the file ``source`` to ``path`` atomically (see :func:`atomic_write`)."""
    with open(source, "rb") as stream:
        atomic_write(path, lambda out: shutil.copyfileobj(stream, out))


def atomic_move(source: str, path: str):
    """Move ``source``, finished by us or by a tool, to ``path`` on the same file system.

    A file is fsynced before the rename; a folder (an unpacked package, say) is renamed
    whole, so ``path`` is complete or absent (its files are not synced one by one). The
    destination's folder is synced afterwards.

    Raises:
        OSError: ``source`` is missing or the rename failed (another file system, ...).
    """
    if not os.path.isdir(source):
        with open(source, "rb") as stream:
            os.fsync(stream.fileno())
    os.replace(source, path)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))
