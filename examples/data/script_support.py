"""What the data scripts share: one-line user errors, atomic writes, checksums, the entry-point wrapper."""

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


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder and os.replace,
    so a reader never sees a half-written file; the result gets the usual (umask) mode."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
