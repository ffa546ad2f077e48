"""A checkpoint's saved options, read in one place (every command and the trainer's check call this).

fairseq saves a model's options in one of two ways: ``cfg["model"]`` and ``cfg["task"]`` (fairseq
>= 0.10; for an architecture registered the legacy way, as ``taskmoe_transformer`` is,
``cfg["model"]`` is an ``argparse.Namespace``), or one legacy ``args`` Namespace holding both (older
checkpoints). fairseq itself reads them in ``checkpoint_utils.load_checkpoint_to_cpu`` (through
``_upgrade_state_dict``, which turns ``args`` into ``cfg``) and ``load_model_ensemble_and_task``;
this reads a checkpoint dict as :func:`taskmoe_fairseq.safe_loading.safe_torch_load` returns it,
without upgrading it (no OmegaConf, and a memory-mapped checkpoint's tensors are not read).
"""

import argparse
from dataclasses import dataclass
from typing import Optional, Tuple

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.expert_parallel.sharded_checkpoint import META, shared_path, stem_of

ARCH = "taskmoe_transformer"
CONSOLIDATE = "python -m taskmoe_fairseq.consolidate --checkpoint-dir DIR --output full.pt"


@dataclass(frozen=True)
class CheckpointConfig:
    """``model``: the model's options (``cfg["model"]`` or the legacy ``args``; a Namespace);
    ``task``: the task's (``cfg["task"]``, a Namespace or dict, or the legacy ``args``)."""

    model: argparse.Namespace
    task: object

    @property
    def extracted_pair(self) -> Optional[str]:
        """The pair an extracted checkpoint serves (``--moe-extracted-lang-pair``); None for a full one."""
        return getattr(self.model, "moe_extracted_lang_pair", None) or None


def saved_options(state) -> Tuple[object, object]:
    """``(model options, task options)`` of a loaded checkpoint ``state`` as saved: ``cfg["model"]``
    and ``cfg["task"]``, each falling back to the legacy ``args``; None where absent. Never raises."""
    if not isinstance(state, dict):
        return None, None
    cfg = state.get("cfg")
    cfg = cfg if isinstance(cfg, dict) else {}
    legacy = state.get("args")
    model, task = cfg.get("model"), cfg.get("task")
    return (legacy if model is None else model), (legacy if task is None else task)


def architecture(options) -> str:
    """The ``--arch`` of saved model options (``arch``, or a dataclass config's ``_name``); ``'None'`` if none."""
    get = options.get if isinstance(options, dict) else lambda name: getattr(options, name, None)
    return str(get("arch") or get("_name"))


def is_taskmoe(options) -> bool:
    """Whether saved model options are a ``taskmoe_transformer`` architecture's."""
    return options is not None and architecture(options).startswith(ARCH)


def read_config(state, path: str, tool: str, hint: Optional[str] = None, full: bool = False,
                shared_file: bool = False) -> CheckpointConfig:
    """The options of the TaskMoE checkpoint ``state`` (loaded from ``path``) for the command ``tool``.

    Args:
        tool: the command's name in the messages (``extract``, ``export``, ``serve``, ``translate``).
        hint: the way out for another architecture (default: ``TOOL works on models trained with
            --arch taskmoe_transformer``).
        full: refuse an extracted checkpoint (the caller needs every expert).
        shared_file: accept an expert-parallel ``-shared.pt`` file (extract reads its shards);
            a ``-rank-N.pt`` shard is always refused.
    Raises:
        TaskMoeError: one line, for: not a fairseq checkpoint (no ``model`` entry); one file of an
            expert-parallel checkpoint (the line says to consolidate it, or which file to pass);
            another architecture (named); an extracted checkpoint where ``full``.
    """
    if not isinstance(state, dict) or "model" not in state:
        raise usage_error(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    meta = state.get(META)  # a file expert-parallel training wrote
    model, task = saved_options(state)
    # the shared file holds the options; a -rank-N.pt shard only experts (training writes the rank's
    # "shard" number into both files' entries, so that entry does not tell them apart)
    if meta and (not shared_file or model is None):
        stem = stem_of(path)
        way_out = (f"{tool} from its shared file {shared_path(stem)}, which reads the shards it needs"
                   if shared_file and stem else f"consolidate it first ({CONSOLIDATE}) and {tool} full.pt")
        raise usage_error(f"{path} is one file of an expert-parallel checkpoint (its experts are in the "
                          f"-rank-N.pt shards): {way_out}")
    if not is_taskmoe(model):
        raise usage_error(f"{path}: not a TaskMoE checkpoint (architecture {architecture(model)!r}); "
                          + (hint or f"{tool} works on models trained with --arch {ARCH}"))
    if isinstance(model, dict):
        model = argparse.Namespace(**model)
    config = CheckpointConfig(model, task)
    if full and config.extracted_pair:
        raise usage_error(f"{path}: already extracted for {config.extracted_pair}; {tool} from the full checkpoint")
    return config
