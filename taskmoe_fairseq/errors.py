"""One-line, actionable errors for bad input.

Library code raises :class:`TaskMoeError`, an ordinary exception, so a serving
process (the hub interface, a thread of a server) can catch it and carry on.
Only command-line entry points turn it into one line and a non-zero exit:

* the plugin's own commands (``python -m taskmoe_fairseq.extract`` ...) wrap
  their ``main`` with :func:`run_cli`, which prints the line and exits 2;
* fairseq's commands (``fairseq-train``, ``fairseq-generate``,
  ``fairseq-interactive``) are not ours to wrap, so importing the plugin
  installs :func:`install_excepthook`: an uncaught :class:`TaskMoeError`
  (or an exception fairseq raised while handling one) prints
  ``taskmoe-fairseq: error: <message>`` instead of a traceback (exit status 1,
  as for any uncaught exception); every other exception keeps Python's usual
  traceback.
"""

import sys
from typing import Callable, List, Optional


class TaskMoeError(ValueError):
    """Bad option, file, checkpoint or request; ``str(error)`` is the one line to show."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


# The old name, kept for code written against it.
TaskMoeUsageError = TaskMoeError


def usage_error(message: str) -> TaskMoeError:
    """Build (not raise) the error, so call sites read ``raise usage_error(...)``."""
    return TaskMoeError(message)


def _cause(value) -> Optional[TaskMoeError]:
    """``value`` or the exception it was raised from or during: fairseq re-raises what fails while
    it loads a checkpoint as ``Exception("Cannot load model parameters from checkpoint ...")``."""
    seen = set()
    while value is not None and id(value) not in seen:
        if isinstance(value, TaskMoeError):
            return value
        seen.add(id(value))
        value = value.__cause__ or value.__context__
    return None


def _excepthook(previous):
    def hook(kind, value, traceback):
        cause = _cause(value)
        if cause is not None:
            print(f"taskmoe-fairseq: error: {cause.message}", file=sys.stderr)
            return
        previous(kind, value, traceback)

    hook._taskmoe_hook = True
    return hook


def install_excepthook():
    """Make an uncaught :class:`TaskMoeError` print one line (idempotent)."""
    if not getattr(sys.excepthook, "_taskmoe_hook", False):
        sys.excepthook = _excepthook(sys.excepthook)


def run_cli(prog: str, main: Callable[[Optional[List[str]]], int], argv=None) -> int:
    """Run an entry point's ``main``; a :class:`TaskMoeError` becomes ``prog: error: ...`` and status 2."""
    try:
        return main(argv) or 0
    except TaskMoeError as error:
        print(f"{prog}: error: {error.message}", file=sys.stderr)
        return 2
