"""``python -m taskmoe_fairseq.serving`` (the same as ``python -m taskmoe_fairseq.serve``)."""

import sys

from taskmoe_fairseq.serving.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
