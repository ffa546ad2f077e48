"""``python -m taskmoe_fairseq.serve``: see :mod:`taskmoe_fairseq.serving.cli`."""

import sys

from taskmoe_fairseq.serving.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
