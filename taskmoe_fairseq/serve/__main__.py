"""``python -m taskmoe_fairseq.serve``: see :mod:`taskmoe_fairseq.serve.cli`."""

import sys

from taskmoe_fairseq.serve.cli import cli

sys.exit(cli())
