"""``python -m taskmoe_fairseq.translate``: see :mod:`taskmoe_fairseq.translate.cli`."""

import sys

from taskmoe_fairseq.translate.cli import main

sys.exit(main())
