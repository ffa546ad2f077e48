"""``python -m taskmoe_fairseq.extract``: see :mod:`taskmoe_fairseq.extract.cli`."""

import sys

from taskmoe_fairseq.extract.cli import main

sys.exit(main())
