"""``python -m taskmoe_fairseq.user_dir``: print the plugin's folder, the ``--user-dir`` fairseq's
commands need from any working folder.

fairseq's ``utils.import_user_module`` takes ``--user-dir`` as a path: relative to the working
folder, else beside fairseq's own package (``site-packages/<user-dir>``). After the editable
install (``pip install -e .``) the plugin lives in the clone, so ``--user-dir taskmoe_fairseq``
works only from the clone's root; elsewhere fairseq stops with ``FileNotFoundError:
<cwd>/taskmoe_fairseq`` before the plugin is imported (so the plugin cannot turn that into one
line). The absolute path always works::

    fairseq-train DATA --user-dir "$(python -m taskmoe_fairseq.user_dir)" --task multilingual_translation_taskmoe ...
"""

import os
import sys

import taskmoe_fairseq


def path() -> str:
    """The absolute folder of the installed ``taskmoe_fairseq`` package (a ``--user-dir`` value)."""
    return os.path.dirname(os.path.abspath(taskmoe_fairseq.__file__))


if __name__ == "__main__":
    print(path())
    sys.exit(0)
