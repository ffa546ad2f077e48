"""``python -m taskmoe_fairseq.consolidate``, the documented name of
:mod:`taskmoe_fairseq.expert_parallel.consolidate` (kept at the top so the command reads as the
other commands do)."""

import sys

from taskmoe_fairseq.expert_parallel.consolidate import main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
