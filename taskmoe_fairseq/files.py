"""Writing files so that a reader never sees half of one: temporary file in the
target's folder, fsync, rename, fsync of the folder (the convention of fairseq's
``checkpoint_utils.torch_persistent_save``, which writes a ``.tmp`` and moves it).

The one implementation in the tree: the plugin's commands, the data scripts under
``examples/data/`` and the benchmarks all write their outputs through it.
"""

import errno
import os
import shutil
import stat
import tempfile
from typing import Callable, Iterable, Union

from taskmoe_fairseq.errors import TaskMoeError, usage_error


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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_replaceable(path: str, what: str = "output"):
    """Refuse to write over anything but a regular file: a rename would replace a symbolic link,
    a device (``/dev/stdout``), a pipe or a socket by a new regular file, the node itself lost.

    Raises:
        TaskMoeError: ``path`` exists (``lstat``: a link is not followed) and is not a regular file.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # absent, or its folder is not one: creating the file says what is wrong
    if not stat.S_ISREG(mode):
        raise usage_error(
            f"{path} is {_kind(mode)}; the {what} must be a regular file or a new path (it is written "
            "beside and renamed into place, which would replace the node)"
        )


def write_error(path: str, error: OSError) -> TaskMoeError:
    """The one line for a failed write of ``path``: the path and the cause (``ENOSPC``, ``EFBIG``,
    ``EDQUOT``, ``EIO``, ...). Built, not raised."""
    code = errno.errorcode.get(error.errno or 0)
    cause = f"{error.strerror or error}" + (f" ({code})" if code else "")
    return usage_error(f"cannot write {path}: {cause}; free space (or raise the file-size limit) or choose another output")


class _RecordingStream:
    """The temporary file as the writer sees it: the first ``OSError`` of a write is kept, for
    writers that swallow it (torch's zip writer raises ``RuntimeError: ... unexpected pos``)."""

    def __init__(self, stream):
        self._stream = stream
        self.error = None

    def write(self, data):
        try:
            return self._stream.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def atomic_write(path: str, data: Union[bytes, Callable]):
    """Write ``data`` (bytes, or a function that writes to a binary stream) to ``path``.

    The file appears complete or not at all, with the usual mode (umask applied); on any
    failure the temporary file is removed and an existing ``path`` is left as it was. Only a
    regular file is replaced (:func:`check_replaceable`).

    Raises:
        TaskMoeError: ``path`` is not a regular file; the folder cannot be created or written;
            writing, syncing or renaming failed (disk full, file too large, quota, I/O error), also
            where the writer turned the ``OSError`` into another exception (torch's ``RuntimeError``).
        Exception: whatever ``data`` raises that is not a write error, after clean-up.
    """
    check_replaceable(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise usage_error(f"cannot write to {folder} ({error.strerror}); choose a writable output folder") from None
    recording = None
    try:
        with os.fdopen(handle, "wb") as stream:
            recording = _RecordingStream(stream)
            if callable(data):
                data(recording)
            else:
                recording.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if recording is not None and recording.error is not None:
            raise write_error(path, recording.error) from None
        if isinstance(error, OSError) and error.filename in (None, temporary, path):
            raise write_error(path, error) from None  # not an error of another file the writer read
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
    destination's folder is synced afterwards. A file replaces only a regular file
    (:func:`check_replaceable`); a folder replaces no symbolic link.

    Raises:
        TaskMoeError: ``path`` is a link, a device, ... (see above).
        OSError: ``source`` is missing or the rename failed (another file system, ...).
    """
    if os.path.isdir(source):
        if os.path.islink(path):
            raise usage_error(f"{path} is a symbolic link; the output must be a real folder or a new path")
    else:
        check_replaceable(path)
        with open(source, "rb") as stream:
            os.fsync(stream.fileno())
    os.replace(source, path)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))
