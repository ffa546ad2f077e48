"""What a server holds once for a full TaskMoE checkpoint, and where each pair's experts come from.

Kudugunta et al. (2021), section 4: at inference a task needs only its k experts per
task-routed layer. :class:`SharedWeights` reads the checkpoint once, memory-mapped through the
safe loader (:func:`taskmoe_fairseq.safe_loading.safe_torch_load`, ``mmap=True``: a tensor is read
from disk only when touched, so the optimizer state and the experts are never read here; a
checkpoint written before experts were stacked is stacked once here, which reads its experts), and
keeps in memory:

* the fairseq config (``cfg``, as ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` builds it,
  with the data folder, ``--bpe sentencepiece`` and ``--cpu`` as overrides) and the task;
* every tensor that is not an expert of a task-routed or static layer, copied out of the map
  once: embeddings, attention, dense FFNs, layer norms, the token-routed MoE layers whole (their
  tokens may use every expert) and the router's gates — these are the tensors every pair's
  sub-network shares;
* the model's own router (:class:`~taskmoe_fairseq.models.router.MoeRouter`, built from the
  checkpoint's args with its gates loaded), whose ``decide_pair`` picks each pair's experts.

:meth:`SharedWeights.read_experts` maps the file again, copies only the requested experts (each
its slice of the layer's stacked tensors) and drops the map, so a pair's experts cost one pickle parse and their own bytes, and an evicted
expert set leaves no mapped pages behind. Before it does, it checks that the file still holds what
the server read at start: same inode, size and modification time, or else the same SHA-256 (taken
once at start, one sequential read of the file), so a ``touch`` or a copy of the same bytes is no
change while an edited or replaced checkpoint is :class:`CheckpointChanged` (a server failure, 503,
not the client's).
"""

import copy
import hashlib
import os
import threading
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models import extraction
from taskmoe_fairseq.models.checkpoint_config import read_config
from taskmoe_fairseq.models.router import ROUTER_PREFIX
from taskmoe_fairseq.modules.expert_feed_forward import EXPERT_NAMES, STACKED_NAMES



class CheckpointChanged(Exception):
    """The checkpoint file no longer holds what the server read at start (the message names the file:
    for the server's log, never for a client)."""


def _config(state: dict, overrides: dict):
    """fairseq's config of a loaded checkpoint (one :func:`~taskmoe_fairseq.models.checkpoint_config.read_config`
    accepted, so it has ``cfg`` or ``args``), as ``load_checkpoint_to_cpu`` + ``load_model_ensemble_and_task``
    build it (legacy ``args`` converted, ``overrides`` applied by name)."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf, overwrite_args_by_name
    from omegaconf import OmegaConf

    if state.get("args") is not None:
        for name, value in overrides.items():
            setattr(state["args"], name, value)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        overwrite_args_by_name(state["cfg"], overrides)
    state = checkpoint_utils._upgrade_state_dict(state)
    if state.get("args") is not None:
        return convert_namespace_to_omegaconf(state["args"])
    return state["cfg"]


class SharedWeights:
    """A checkpoint's config, task, shared tensors and router (see the module docstring).

    Args:
        checkpoint: full (or extracted) TaskMoE checkpoint.
        data_dir: the binarized data folder with the dictionaries (default: the checkpoint's own folder
            when it holds them, as extract writes them, else the folder recorded at training).
        spm_model: SentencePiece model (default ``DATA_DIR/spm.model``).
        device: where the shared tensors, the router and every pair's experts live
            (:func:`taskmoe_fairseq.devices.resolve_device`; default the CPU).
    Raises:
        TaskMoeError: unreadable or not a TaskMoE checkpoint, missing data folder or SentencePiece model.
    """

    def __init__(self, checkpoint: str, data_dir: str = None, spm_model: str = None,
                 device: torch.device = torch.device("cpu")):
        from taskmoe_fairseq import safe_loading
        from taskmoe_fairseq.extract import assets
        from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel
        from taskmoe_fairseq.translate import load_spm

        self.path = os.path.abspath(checkpoint)
        self.device = device
        if not os.path.exists(self.path):
            raise usage_error(safe_loading.missing_checkpoint(checkpoint))
        if not os.path.isfile(self.path):  # a pipe would block the read forever
            raise usage_error(f"{checkpoint} is not a regular file (a folder, pipe or device); pass a checkpoint file")
        self._lock = threading.Lock()
        self._stamp, self._changed_stamp = self._file_stamp(), None
        self._digest = self._content_digest()
        state = safe_loading.safe_torch_load(self.path, mmap=True)
        saved = read_config(state, checkpoint, "serve", hint="serve models trained with --arch taskmoe_transformer")
        languages = assets.model_languages(saved.model)[0]
        self.data_dir = assets.data_dir_for(self.path, assets.recorded_data_dir(state), languages, data_dir)  # --data-dir, beside, recorded
        self.spm_model = os.path.abspath(spm_model or os.path.join(self.data_dir, "spm.model"))
        load_spm(self.spm_model)  # one clear line before fairseq opens it
        overrides = {"data": self.data_dir, "bpe": "sentencepiece", "sentencepiece_model": self.spm_model,
                     "cpu": device.type == "cpu"}
        self.cfg = _config(state, overrides)
        self.model_class = TaskMoeTransformerModel
        self.args = copy.deepcopy(self.cfg.model)
        self.known_pairs = self._training_pairs()
        self.task = self.pair_task(self.known_pairs[0])
        self.layers = extraction.extractable_layers(self.args)
        self.extracted_pair = getattr(self.args, "moe_extracted_lang_pair", None)

        with torch.device("meta"):  # the full architecture, no memory: for key upgrades and the router
            full = self.model_class.build_model(copy.deepcopy(self.args), self.task)
        self._skeleton = full
        model_state = state["model"]
        full.upgrade_state_dict(model_state)
        expected = full.state_dict()  # the shapes this data folder's dictionaries give the model
        for key, tensor in model_state.items():
            if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
                raise usage_error(
                    f"{checkpoint} does not fit the dictionaries in {self.data_dir}: {key} is {tuple(tensor.shape)} in the "
                    f"checkpoint, {tuple(expected[key].shape)} with those dictionaries; pass the --data-dir the model "
                    "was trained on"
                )
        replaced = extraction.replaced_prefixes(self.layers)
        parameter_names = {name for name, _ in full.named_parameters()}
        self.shared: Dict[str, torch.Tensor] = {}
        router_state = {}
        for key, tensor in model_state.items():
            if key.startswith(ROUTER_PREFIX):
                router_state[key[len(ROUTER_PREFIX):]] = tensor.to(device, copy=True)
            if key.startswith(replaced):
                continue
            owned = tensor.to(device, copy=True)  # out of the map: the shared copy
            self.shared[key] = nn.Parameter(owned, requires_grad=False) if key in parameter_names else owned
        self.router = full.encoder.moe_router
        nn.Module.load_state_dict(self.router, router_state, strict=True, assign=True)
        del state, model_state

    def _file_stamp(self):
        info = os.stat(self.path)  # the change time too: an in-place rewrite with the old mtime put back moves it
        return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns

    def _content_digest(self) -> str:
        with open(self.path, "rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()

    def check_unchanged(self) -> None:
        """Raise :class:`CheckpointChanged` if the file's content differs from the one read at start (or it
        is gone). A new stamp (inode, size, mtime) costs one SHA-256 of the file; the same content again
        (``touch``) is accepted and its stamp remembered. Thread-safe.
        """
        with self._lock:
            try:
                stamp = self._file_stamp()
            except OSError as error:
                raise CheckpointChanged(f"{self.path} cannot be read any more ({error.strerror or error})") from None
            if stamp == self._stamp:
                return
            if stamp != self._changed_stamp:
                try:
                    same = self._content_digest() == self._digest
                except OSError as error:
                    raise CheckpointChanged(f"{self.path} cannot be read any more ({error.strerror or error})") from None
                if same:
                    self._stamp = stamp  # touched or copied, same bytes
                    return
                self._changed_stamp = stamp
            raise CheckpointChanged(f"{self.path} changed on disk since the server started (its SHA-256 differs); "
                                    "restart the server to serve the new checkpoint")

    def _training_pairs(self) -> List[str]:
        pairs = getattr(self.cfg.task, "lang_pairs", None)
        pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs or [])
        extracted = getattr(self.cfg.model, "moe_extracted_lang_pair", None)
        if extracted:
            return [extracted]
        if not pairs:
            raise usage_error(f"{self.path}: the checkpoint records no --lang-pairs; pass --lang-pairs")
        return pairs

    def pair_task(self, pair: str, setup=None):
        """The task set up for ``pair`` (fairseq's multilingual task reads the direction from its
        args). Dictionaries already read are reused; fairseq's ``setup_task`` reads the others."""
        from fairseq import tasks

        args = copy.copy(self.cfg.task)
        source, target = pair.split("-")
        args.source_lang, args.target_lang = source, target
        dicts = getattr(self, "_dicts", {})
        if source in dicts and target in dicts:
            return type(self.task)(args, self.task.langs, {lang: dicts[lang] for lang in (source, target)}, False)
        task = tasks.setup_task(args, from_checkpoint=True)
        self._dicts = {**task.dicts, **dicts}
        return task

    def read_experts(self, experts: Iterable[Tuple[str, int, int]]) -> Dict[Tuple[str, int, int], Tuple[torch.Tensor, ...]]:
        """Copies of experts ``(side, layer index, expert id)`` on the server's device, read from a
        fresh map of the checkpoint: ``{(side, index, e): (fc1.weight [F, C], fc1.bias [F],
        fc2.weight [C, F], fc2.bias [C])}``. Only each expert's slice of the layer's stacked tensors
        (``...moe.experts.fc1_weight [E, F, C]``) is read; a checkpoint written before experts were
        stacked is read from its per-expert tensors (``...moe.experts.{e}.fc1.weight``) as they are.

        Raises:
            CheckpointChanged: the file's content changed since the server started (:meth:`check_unchanged`).
        """
        from taskmoe_fairseq import safe_loading

        self.check_unchanged()
        state = safe_loading.safe_torch_load(self.path, mmap=True)
        model_state = state["model"]
        out = {}
        for side, index, expert in experts:
            prefix = f"{extraction.moe_prefix(side, index)}experts."
            if prefix + STACKED_NAMES[0] in model_state:
                tensors = (model_state[prefix + name][expert] for name in STACKED_NAMES)
            else:
                tensors = (model_state[f"{prefix}{expert}.{name}"] for name in EXPERT_NAMES)
            out[(side, index, expert)] = tuple(tensor.to(self.device, copy=True) for tensor in tensors)
        del state, model_state
        return out
