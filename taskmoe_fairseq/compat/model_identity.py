"""fairseq's trainer refuses a checkpoint whose model is not this run's model.

``Trainer.load_checkpoint`` (resuming from ``--save-dir``, ``--restore-file``,
``--finetune-from-model``) loads the checkpoint's parameters into the model built from this run's
options: other shapes are a ``size mismatch`` traceback, equal shapes with another meaning (another
``--langs`` order, routing or top-k) load silently and train a corrupted model. Before it loads,
every rank reads the checkpoint's config (mapped, its tensors are not read) and compares it with
the model's (:func:`taskmoe_fairseq.models.identity.check_same_model`): one line instead.
A run without expert parallelism pointed at a folder of expert shards (``<name>-shared.pt``, no
``<name>.pt``) stops with one line too, instead of starting afresh.

Applied when the plugin's task trains (:func:`taskmoe_fairseq.compat.apply_for_training`).
"""

import functools
import os

from taskmoe_fairseq.expert_parallel import sharded_checkpoint
from taskmoe_fairseq.expert_parallel.training import expert_parallel_of
from taskmoe_fairseq.safe_loading import safe_torch_load
from taskmoe_fairseq.errors import usage_error


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


def refuse_per_expert_optimizer_state(filename: str) -> None:
    """Raise :class:`~taskmoe_fairseq.errors.TaskMoeError` if ``filename`` (a checkpoint or an
    expert shard) holds experts as separate modules (``...moe.experts.0.fc1.weight``, written
    before experts were stacked) together with optimizer state: its weights load (the model's
    ``upgrade_state_dict_named`` stacks them) but the optimizer's per-parameter state does not fit
    the stacked parameters, and fairseq would stop with a traceback. Resuming with
    ``--reset-optimizer`` (or ``--finetune-from-model``) is what works."""
    if not os.path.isfile(filename):
        return
    state = safe_torch_load(filename, mmap=True)
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict) or not ("last_optimizer_state" in state or "optimizer_state" in state):
        return
    if any(sharded_checkpoint.EXPERT_KEY.match(key) for key in model):
        raise usage_error(
            f"{filename} holds its experts as separate modules (written before experts were stacked): its weights "
            "load, its optimizer state does not fit; resume with --reset-optimizer, which also starts fairseq's "
            "update count and learning-rate schedule again (set --max-update to the updates still to run)"
        )


def refuse_a_folder_of_shards(filename: str) -> None:
    """Raise :class:`~taskmoe_fairseq.errors.TaskMoeError` if ``filename`` (``<name>.pt``) is absent but
    its expert-parallel ``<name>-shared.pt`` is there: fairseq would start afresh beside it."""
    shared = sharded_checkpoint.shared_path(filename[: -len(".pt")]) if filename.endswith(".pt") else None
    if shared and not os.path.exists(filename) and os.path.isfile(shared):
        size = sharded_checkpoint.read_meta(shared)["size"]
        raise usage_error(
            f"{os.path.dirname(filename) or '.'} holds an expert-parallel checkpoint ({os.path.basename(shared)}, "
            f"P = {size}) and no {os.path.basename(filename)}: resume with --moe-expert-parallel-size {size}, "
            "or consolidate it (python -m taskmoe_fairseq.consolidate) for single-process use"
        )


def apply():
    """Wrap ``fairseq.trainer.Trainer.load_checkpoint`` (once): the checks above, then fairseq's."""
    from fairseq.trainer import Trainer

    original_load = Trainer.load_checkpoint
    if getattr(original_load, "_taskmoe_identity", False):
        return

    @functools.wraps(original_load)
    def load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
        if expert_parallel_of(self._model) is None:
            refuse_a_folder_of_shards(filename)
        check_checkpoint_fits(self._model, filename)
        if not reset_optimizer:
            refuse_per_expert_optimizer_state(filename)
        return original_load(self, filename, reset_optimizer, *args, **kwargs)

    load_checkpoint._taskmoe_identity = True
    Trainer.load_checkpoint = load_checkpoint
