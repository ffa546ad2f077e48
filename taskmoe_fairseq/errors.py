"""One-line, actionable errors for bad input.

fairseq's CLIs print a full traceback for any exception. A user who passed a
wrong option should instead see one line that names the option (or file) and
the fix, so configuration errors raise :class:`TaskMoeUsageError`, a
``SystemExit`` whose message Python prints without a traceback.
"""


class TaskMoeUsageError(SystemExit):
    """Bad option, file or checkpoint: prints one line and exits with status 1."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"taskmoe-fairseq: error: {message}")

    def __str__(self) -> str:
        return self.message


def usage_error(message: str) -> TaskMoeUsageError:
    """Build (not raise) the error, so call sites read ``raise usage_error(...)``."""
    return TaskMoeUsageError(message)
