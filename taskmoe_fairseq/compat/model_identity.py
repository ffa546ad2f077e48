"""fairseq's trainer refuses a checkpoint whose model is not this run's model.

``Trainer.load_checkpoint`` (resuming from ``--save-dir``, ``--restore-file``,
``--finetune-from-model``) loads the checkpoint's parameters into the model built from this run's
options: other shapes are a ``size mismatch`` traceback, equal shapes with another meaning (another
``--langs`` order, routing or top-k) load silently and train a corrupted model. Before it loads,
every rank reads the checkpoint's config (mapped, its tensors are not read) and compares it with
the model's (:func:`taskmoe_fairseq.models.identity.check_same_model`): one line instead.
"""

import functools
import os

from taskmoe_fairseq import sharded_checkpoint
from taskmoe_fairseq.compat.safe_loading import safe_torch_load


def _config_file(filename: str):
    """The file holding ``filename``'s config (an expert shard's is its ``-shared.pt``); None if absent."""
    stem = sharded_checkpoint.stem_of(filename)
    shared = sharded_checkpoint.shared_path(stem) if stem else None
    if shared and os.path.isfile(shared):
        return shared
    return filename if os.path.isfile(filename) else None


def check_checkpoint_fits(model, filename: str) -> None:
    """Raise :class:`~taskmoe_fairseq.errors.TaskMoeError` if the checkpoint ``filename`` is not
    ``model``'s kind of model (nothing is checked for other models or a missing file)."""
    from taskmoe_fairseq.models.identity import check_same_model, checkpoint_model_args
    from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

    if not isinstance(model, TaskMoeTransformerModel):
        return
    path = _config_file(filename)
    if path is None:
        return
    saved = checkpoint_model_args(safe_torch_load(path, mmap=True))
    if saved is not None:
        check_same_model(saved, model.args, filename)


def apply():
    from fairseq.trainer import Trainer

    original_load = Trainer.load_checkpoint
    if getattr(original_load, "_taskmoe_identity", False):
        return

    @functools.wraps(original_load)
    def load_checkpoint(self, filename, *args, **kwargs):
        check_checkpoint_fits(self._model, filename)
        return original_load(self, filename, *args, **kwargs)

    load_checkpoint._taskmoe_identity = True
    Trainer.load_checkpoint = load_checkpoint
