"""What the example scripts share: one-line user errors, the entry-point wrapper, checksums, and
the one implementation of atomic, durable file writes (temporary file in the same folder, fsync,
os.replace, fsync of the folder), so a reader never sees a half-written file, even after a crash."""

import hashlib
import os
import sys
import tempfile


class UserError(Exception):
    """An error reported to the user as one line, without a traceback."""


def run_main(main):
    """Run ``main()`` as a script: ``error: ...`` and a non-zero status instead of a traceback."""
    try:
        sys.exit(main())
    except UserError as e:
        print("error: %s" % e, file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def log(msg):
    """Print a progress line (flushed, so it interleaves correctly with subprocess output)."""
    print(msg, flush=True)


def warn(msg):
    """Print a ``warning: ...`` line on stderr."""
    print("warning: " + msg, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_folder(folder):
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_move(src, dst):
    """Move the finished file ``src`` (written by us or by a tool) to ``dst`` on the same file
    system: fsync its data, os.replace, then fsync the destination folder."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    _fsync_folder(os.path.dirname(os.path.abspath(dst)))


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder that is fsynced and
    then moved into place; on any failure the temporary file is removed and ``path`` is left as it
    was. The result gets the usual (umask) mode."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        atomic_move(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_lines(path, lines):
    """Write one UTF-8 line per item (items must not contain a newline) atomically."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def atomic_copy(src, dst):
    """Copy the file ``src`` to ``dst`` atomically."""
    with open(src, "rb") as f:
        atomic_write_bytes(dst, f.read())
