"""taskmoe_fairseq: Task-level Mixture-of-Experts for fairseq (Kudugunta et al., 2021).

Loaded with ``--user-dir taskmoe_fairseq``; importing it registers the task
``multilingual_translation_taskmoe``, the model ``taskmoe_transformer`` (and its
presets) and the criterion ``moe_label_smoothed_cross_entropy``.
"""

from taskmoe_fairseq import compat, errors

compat.apply()
errors.install_excepthook()  # fairseq's CLIs print a TaskMoeError as one line

from taskmoe_fairseq import criterions, models, tasks  # noqa: E402,F401  (registers them)

__version__ = "0.1.0"
