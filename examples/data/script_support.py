"""What the data scripts share: one-line user errors and the entry-point wrapper."""

import sys


class UserError(Exception):
    """An error reported to the user as one line, without a traceback."""


def run_main(main):
    """Run ``main()`` as a script: ``error: ...`` and a non-zero status instead of a traceback."""
    try:
        sys.exit(main())
    except UserError as e:
        print("error: %s" % e, file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
