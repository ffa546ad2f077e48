"""Compatibility shims for fairseq on current torch, applied once on plugin import:

* :mod:`.safe_loading`: torch's safe loader plus an explicit allow-list on every fairseq
  load path, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says; one-line refusals;
* :mod:`.distributed`: every DDP backend trains and resumes a model with experts
  (plain-container broadcast, ``find_unused_parameters``, CPU ``torchrun``);
* :mod:`.expert_parallel`: the trainer with ``--moe-expert-parallel-size`` (expert
  parameters out of DDP, their gradients normalised, one gradient norm);
* :mod:`.expert_parallel_checkpoints`: its sharded checkpoints (save, resume, checks);
* :mod:`.model_identity`: training refuses a checkpoint of another model (``--langs`` order,
  MoE and size options) with one line;
* fairseq is imported quietly (below).
"""

import logging
import warnings

from taskmoe_fairseq.compat import distributed, expert_parallel, expert_parallel_checkpoints, model_identity, safe_loading
from taskmoe_fairseq.compat.distributed import _plain, has_experts  # noqa: F401
from taskmoe_fairseq.compat.safe_loading import (  # noqa: F401
    SAFE_GLOBALS,
    SAFE_LOAD_MODULES,
    describe_load_failure,
    safe_torch_load,
)


def _import_fairseq_quietly():
    """Import fairseq without its import-time nags (fairscale's FutureWarnings about
    ``torch.cuda.amp``, a tensorboardX hint), so ``import taskmoe_fairseq`` prints nothing.

    fairseq's speech tasks call ``logging.basicConfig(level=DEBUG)`` when imported; in a program
    that has not configured logging itself, that would turn on every library's debug output
    (matplotlib's font search, for one), so the root logger is put back as it was. The fairseq
    CLIs configure logging before they load a plugin and are not affected."""
    logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"fairscale")
        import fairseq.checkpoint_utils  # noqa: F401
        import fairseq.tasks  # noqa: F401
    if not handlers:
        root.setLevel(level)
        for handler in root.handlers[:]:
            root.removeHandler(handler)


def apply():
    _import_fairseq_quietly()
    safe_loading.apply()
    distributed.apply()
    expert_parallel.apply()
    model_identity.apply()  # inside expert_parallel_checkpoints' wrapper: its checks of a shard set come first
    expert_parallel_checkpoints.apply()
