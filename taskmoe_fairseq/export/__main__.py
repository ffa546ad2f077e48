"""``python -m taskmoe_fairseq.export``: see :mod:`taskmoe_fairseq.export.cli`."""

import sys

from taskmoe_fairseq.export.cli import main

sys.exit(main())
