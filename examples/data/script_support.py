"""What the example scripts share: the entry-point wrapper, one-line errors, progress lines,
checksums, and the names of the atomic writes.

Atomic, durable file writes have their one home in the plugin's ``taskmoe_fairseq.files``;
the functions here hand each call to it. Importing the plugin loads torch and fairseq (about
5 s of CPU time), so it is imported on the first write, not at start-up: ``--help`` and option
errors stay instant.
"""

import argparse
import errno
import hashlib
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class UserError(Exception):
    """An error reported to the user as one line, without a traceback."""


def _files():
    """``taskmoe_fairseq.files``, imported on first use (from this checkout when run from one)."""
    if _REPO not in sys.path:
        sys.path.insert(0, _REPO)
    from taskmoe_fairseq import files

    return files


def atomic_write(path, data):
    """``taskmoe_fairseq.files.atomic_write``: bytes (or a function writing to a binary stream)."""
    _files().atomic_write(path, data)


def atomic_write_text(path, text):
    """``taskmoe_fairseq.files.atomic_write_text``: UTF-8 text."""
    _files().atomic_write_text(path, text)


def atomic_write_lines(path, lines):
    """``taskmoe_fairseq.files.atomic_write_lines``: one UTF-8 line per item."""
    _files().atomic_write_lines(path, lines)


def atomic_copy(src, dst):
    """``taskmoe_fairseq.files.atomic_copy``."""
    _files().atomic_copy(src, dst)


def atomic_move(src, dst):
    """``taskmoe_fairseq.files.atomic_move``: a finished file (synced first) or a whole folder."""
    _files().atomic_move(src, dst)


atomic_write_bytes = atomic_write  # the name examples/quickstart.py and paper_table1.py import


def _one_line_errors():
    """UserError, and the plugin's TaskMoeError once the plugin is loaded (an unwritable folder)."""
    plugin = sys.modules.get("taskmoe_fairseq.errors")
    return (UserError,) if plugin is None else (UserError, plugin.TaskMoeError)


# the causes of a failed write: disk full, quota, file-size limit, I/O error, read-only file system
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def run_main(main):
    """Run ``main()`` as a script: ``error: ...`` and exit status 2 (as argparse's usage errors and
    the plugin's commands) instead of a traceback, also for a failed write (disk full, file too large,
    ...); 130 when interrupted."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = " %s" % e.filename if e.filename else ""
        print("error: cannot write%s: %s (%s); free space (or raise the file-size limit) or choose another --out"
              % (where, e.strerror, errno.errorcode[e.errno]), file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not isinstance(e, _one_line_errors()):
            raise
        print("error: %s" % e, file=sys.stderr)
        sys.exit(2)


def script_parser(doc):
    """The scripts' argument parser: the first line of the script's docstring ``doc`` as its
    description, every option's default shown in ``--help``."""
    return argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def log(msg):
    """Print a progress line (flushed, so it interleaves correctly with subprocess output)."""
    print(msg, flush=True)


def warn(msg):
    """Print a ``warning: ...`` line on stderr."""
    print("warning: " + msg, file=sys.stderr, flush=True)


def sha256_file(path):
    """Hex sha256 of the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
