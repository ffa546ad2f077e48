"""Adding languages to a trained TaskMoE model without changing one output of its old pairs
(issue 32, docs/add-language.md).

With task routing a new language is a new task: new rows in the task gates, optionally new experts
that only those rows can select, and the new language tag's embedding row. It runs on fairseq's own
fine-tuning path::

    fairseq-train NEW_BIN ... --langs <the model's languages>,it --lang-pairs <old pairs>,en-it,it-en \\
        --finetune-from-model FULL.pt --moe-add-langs it [--moe-new-experts 2 --moe-new-experts-init-from fr]

and keeps fairseq's checkpoint layout: the saved ``state_dict`` has the ordinary keys (a gate's
``task_logits`` ``[T', E + N]``, ``moe.experts.fc1_weight`` ``[E + N, F, C]`` ..., ``embed_tokens.weight``
``[V + n, C]``),
so extract, export, translate and serve read it like any other. The pieces, each in one function:

* :func:`grow_state_dict` (called by the model's ``upgrade_state_dict_named`` when the checkpoint is the
  model before adding): the old tensors placed in the grown shapes, the new parts initialised;
* :func:`freeze_for_adding` (called by the task's ``build_model`` when training): every old parameter
  frozen; the new rows of a tensor that also holds old rows (a gate's table, an embedding, a layer's
  stacked experts ``[E + N, ...]``) become their own ``Parameter``
  (``<name>_new``), combined with the frozen rows before each forward (:class:`AddedRows`), so that
  fairseq's Trainer, which builds its optimizer from the parameters with ``requires_grad``, holds
  only the new ones; the model's ``state_dict`` / ``load_state_dict`` show the combined tensor;
* :func:`old_task_mask`: which gate rows are old (an old row never selects a new expert:
  :class:`~taskmoe_fairseq.modules.task_gate.TaskGate`);
* :func:`old_pair_model_parts`: extraction of an old pair from the grown model gives exactly the
  sub-network the model had before (the old language list, the old dictionary's rows).

What can be added (per side's routing, :func:`check_add_request`): a learned task gate (source,
target, pair) gets new rows and the new experts; token, sentence and static sides stay frozen and
hold no new experts (a token or sentence gate would send old pairs' tokens to new experts; a static
rule's assignment ``(t * k + j) mod E`` of old tasks would move). A model with no learned task gate is
refused.
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.modules import routing_kinds

#: logit margin of a new task's new experts over the experts it was initialised from
NEW_EXPERT_MARGIN = 3.0
#: the state-dict keys of the (possibly shared) token embedding matrices
EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")
SIDES = ("encoder", "decoder")


def added_langs(cfg) -> List[str]:
    """``--moe-add-langs`` as a list (the command line's comma form or a list)."""
    value = getattr(cfg, "moe_add_langs", None) or []
    if isinstance(value, str):
        value = value.split(",")
    return [lang.strip() for lang in value if lang.strip()]


def old_langs(langs: Sequence[str], cfg) -> List[str]:
    """The model's languages before adding (the added ones are the last)."""
    added = added_langs(cfg)
    return list(langs)[: len(langs) - len(added)] if added else list(langs)


def old_task_mask(cfg, key: Optional[str], langs: Sequence[str]) -> Optional[List[bool]]:
    """``[num_tasks]`` booleans, True for a task of the model before adding (task ids as
    :func:`~taskmoe_fairseq.modules.routing_kinds.task_ids` with ``len(langs)`` languages); None when
    no language was added or ``key`` is not a task key."""
    if not added_langs(cfg) or key is None:
        return None
    num, old = len(langs), len(old_langs(langs, cfg))
    if key == "pair":
        return [s < old and t < old for s in range(num) for t in range(num)]
    return [lang < old for lang in range(num)]


def learned_task_sides(cfg) -> List[str]:
    """Sides with MoE layers routed by a learned task gate (source, target, pair): they take new rows and experts."""
    return [side for side in SIDES if getattr(cfg, f"{side}_moe_freq", 0) > 0
            and routing_kinds.task_key(getattr(cfg, f"{side}_moe_routing"))
            and not routing_kinds.is_static(getattr(cfg, f"{side}_moe_routing"))]


def check_add_request(args, langs: Sequence[str]) -> None:
    """Refuse, with one line each, what cannot be added (``args``: the model's, ``langs``: this run's ``--langs``).

    Raises:
        TaskMoeError: ``--moe-new-experts``/``--moe-new-experts-init-from``/``--moe-add-train-all`` without
            ``--moe-add-langs``; added languages that are not the last of ``--langs``, repeated or all of
            them; an init language that is not an old one; a model with no learned task gate (token, sentence
            or static routing on both sides); new experts with expert parallelism; an extracted model.
    """
    added = added_langs(args)
    if not added:
        for name in ("moe_new_experts", "moe_new_experts_init_from", "moe_add_train_all"):
            if getattr(args, name, None):
                raise usage_error(f"--{name.replace('_', '-')} needs --moe-add-langs LANGS (the languages to add)")
        return
    langs = list(langs)
    if len(set(added)) != len(added) or langs[len(langs) - len(added):] != added or len(added) >= len(langs):
        raise usage_error(
            f"--moe-add-langs {','.join(added)} must be the last languages of --langs ({','.join(langs)}), after the "
            f"model's own: pass --langs <the model's --langs>,{','.join(added)}"
        )
    old = old_langs(langs, args)
    init = getattr(args, "moe_new_experts_init_from", None)
    if init is not None and init not in old:
        raise usage_error(f"--moe-new-experts-init-from {init} is not one of the model's languages ({','.join(old)})")
    if (getattr(args, "moe_new_experts", 0) or 0) < 0:
        raise usage_error(f"--moe-new-experts must be >= 0, got {args.moe_new_experts}")
    if not learned_task_sides(args) and not getattr(args, "moe_add_train_all", False):
        raise usage_error(
            f"the model routes its MoE layers by {args.encoder_moe_routing}/{args.decoder_moe_routing} (encoder/decoder): "
            "with no learned task gate, an added language shares every expert and gate with the old pairs and "
            "only its tag's embedding could train; add languages to a model with source, target or pair routing"
        )
    if (getattr(args, "moe_new_experts", 0) or 0) > 0 and (getattr(args, "moe_expert_parallel_size", 1) or 1) > 1:
        raise usage_error("--moe-new-experts with --moe-expert-parallel-size > 1 is not supported: add the "
                          "language to the consolidated checkpoint (python -m taskmoe_fairseq.consolidate)")


def pair_trains(args, pair: str, langs: Sequence[str]) -> bool:
    """Whether training on ``pair`` reaches a new parameter: the new tag (the target's, with
    ``--encoder-langtok tgt``/``--decoder-langtok``; the source's with ``--encoder-langtok src``) or a
    new task's gate row on a learned task side. (With ``--moe-add-train-all`` every pair with an
    added language trains.)"""
    import argparse

    from taskmoe_fairseq.models.moe_options import set_moe_defaults

    args = argparse.Namespace(**vars(args))  # the task's args: the routing options may be unset (their presets)
    set_moe_defaults(args)
    added = set(added_langs(args))
    src, tgt = pair.split("-")
    if not ({src, tgt} & added):
        return False
    if getattr(args, "moe_add_train_all", False):
        return True
    tags = set()
    if getattr(args, "encoder_langtok", None) == "tgt" or getattr(args, "decoder_langtok", False):
        tags.add(tgt)
    if getattr(args, "encoder_langtok", None) == "src":
        tags.add(src)
    if tags & added:
        return True
    for side in learned_task_sides(args):
        key = routing_kinds.task_key(getattr(args, f"{side}_moe_routing"))
        if key == "pair" or (key == "source" and src in added) or (key == "target" and tgt in added):
            return True
    return False


# ----------------------------------------------------------------------------- growing a checkpoint


def _tag_index(dictionary, lang: str) -> Optional[int]:
    index = dictionary.index(f"__{lang}__")
    return None if index == dictionary.unk() else index


def _init_task(key: str, langs: Sequence[str], old: Sequence[str], init: str, new_task: int) -> int:
    """The task id (in the grown numbering) a new task starts from: each added language replaced by ``init``."""
    num = len(langs)
    if key == "pair":
        src, tgt = divmod(new_task, num)
        src, tgt = (langs.index(init) if s >= len(old) else s for s in (src, tgt))
        return src * num + tgt
    return langs.index(init)


def grow_state_dict(model, state_dict: Dict[str, torch.Tensor], prefix: str = "") -> None:
    """In place: the state dict of the model before adding becomes one for ``model`` (built with
    ``--moe-add-langs``). Nothing is done when ``state_dict`` already has the grown shapes (a resumed run).

    * embeddings ``[V, C]`` -> ``[V + n, C]``: the old rows, then each new tag's row (a copy of
      ``--moe-new-experts-init-from``'s tag row, else ``model``'s own initialisation);
    * a learned task gate's ``task_logits`` ``[T, E]`` -> ``[T', E + N]``: each old task's row at its id
      in the grown numbering (pair ids ``src * L + tgt`` move with L), ``-inf`` for the new experts
      (never read: :class:`TaskGate` masks them); a new task's row is the init language's task's row
      (else ``model``'s), its new experts :data:`NEW_EXPERT_MARGIN` above the experts they copy;
    * new experts (rows ``E + j`` of the stacked ``moe.experts.*``, :func:`grow_experts`): copies of the
      init task's j-th (mod k) chosen expert in that layer (else ``model``'s own initialisation).

    Raises:
        TaskMoeError: the checkpoint's vocabulary is not the model's minus the new tags.
    """
    args = model.args
    key0 = prefix + EMBEDDING_KEYS[0]
    own = model.state_dict()
    if key0 not in state_dict or state_dict[key0].size(0) == own[EMBEDDING_KEYS[0]].size(0):
        return
    langs = list(args.taskmoe_langs)
    old = old_langs(langs, args)
    added = added_langs(args)
    init = getattr(args, "moe_new_experts_init_from", None)
    dictionary = model.encoder.dictionary
    vocab_old, vocab = state_dict[key0].size(0), own[EMBEDDING_KEYS[0]].size(0)
    if vocab - vocab_old != len(added):
        raise usage_error(
            f"the checkpoint's vocabulary has {vocab_old} entries and this run's {vocab}, not {len(added)} more "
            f"(the tags of --moe-add-langs {','.join(added)}): binarize the new pairs with the model's own dictionary "
            "(examples/data/binarize.py --extend-from OLD_BIN)"
        )
    for name in EMBEDDING_KEYS:
        if prefix + name not in state_dict:
            continue
        grown = own[name].detach().clone()
        grown[:vocab_old] = state_dict[prefix + name]
        if init is not None:
            source = _tag_index(dictionary, init)
            for lang in added:
                target = _tag_index(dictionary, lang)
                if source is not None and target is not None:
                    grown[target] = state_dict[prefix + name][source]
        state_dict[prefix + name] = grown
    from taskmoe_fairseq.models.router import gate_key_prefix

    num_experts = int(args.moe_expert_count)
    for side in learned_task_sides(args):
        key = routing_kinds.task_key(getattr(args, f"{side}_moe_routing"))
        mask = old_task_mask(args, key, langs)
        new_experts = len(getattr(model, side).layers[_first_moe_index(model, side)].moe.experts) - num_experts
        for index, moe in _moe_layers(model, side):
            logits_key = f"{prefix}{gate_key_prefix(side, index)}task_logits"
            if logits_key not in state_dict:
                continue
            before = state_dict[logits_key]
            grown = own[logits_key[len(prefix):]].detach().clone()
            for task in range(grown.size(0)):
                if mask[task]:
                    grown[task, :num_experts] = before[_old_task_id(key, task, len(langs), len(old))]
                    grown[task, num_experts:] = float("-inf")
            init_tasks = {}
            for task in range(grown.size(0)):
                if mask[task] or init is None:
                    continue
                source = _old_task_id(key, _init_task(key, langs, old, init, task), len(langs), len(old))
                init_tasks[task] = source
                grown[task, :num_experts] = before[source]
            # new experts: copies of the init task's chosen experts (the first new task's), above them in its rows
            chosen = []
            if init_tasks:
                first = before[next(iter(init_tasks.values()))]
                chosen = first.topk(int(args.moe_top_k)).indices.tolist()
            grow_experts(state_dict, own, f"{side}.layers.{index}.moe.experts.", prefix, num_experts, chosen)
            for j in range(new_experts):
                for task in range(grown.size(0)):
                    if not mask[task]:
                        above = grown[task, chosen[j % len(chosen)]] if chosen else grown[task, :num_experts].max()
                        grown[task, num_experts + j] = above + NEW_EXPERT_MARGIN
            state_dict[logits_key] = grown


def grow_experts(state_dict, own, keys: str, prefix: str, num_experts: int, chosen: List[int]) -> None:
    """The one place that grows a layer's experts in a state dict (stacked storage: ``<keys>fc1_weight``
    ``[E, F, C]`` ... -> ``[E + N, ...]``, :class:`~taskmoe_fairseq.modules.expert_feed_forward.StackedExperts`):
    new expert ``j`` a copy of expert ``chosen[j mod k]``, or, without ``chosen``, ``own``'s (the built
    model's) initialisation."""
    from taskmoe_fairseq.modules.expert_feed_forward import STACKED_NAMES

    for name in STACKED_NAMES:
        before = state_dict[prefix + keys + name]
        grown = own[keys + name].detach().clone()
        grown[:num_experts] = before
        for j in range(grown.size(0) - num_experts):
            if chosen:
                grown[num_experts + j] = before[chosen[j % len(chosen)]]
        state_dict[prefix + keys + name] = grown


def _old_task_id(key: str, task: int, num: int, old: int) -> int:
    """An old task's id in the numbering before adding."""
    if key == "pair":
        src, tgt = divmod(task, num)
        return src * old + tgt
    return task


def _moe_layers(model, side):
    from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward

    for index, layer in enumerate(getattr(model, side).layers):
        moe = getattr(layer, "moe", None)
        if isinstance(moe, MoeFeedForward):
            yield index, moe


def _first_moe_index(model, side) -> int:
    return next(index for index, _ in _moe_layers(model, side))


# ----------------------------------------------------------------------------- freezing: only new parameters train


class AddedRows:
    """The rows ``rows`` of a parameter (``[N, ...]``) trained apart from the others: the module
    attribute ``name`` becomes ``frozen.index_put(rows, new)`` (recomputed before each forward of the
    modules that read it), ``new`` a ``Parameter`` ``[len(rows), ...]`` registered on the first module
    as ``<name>_new``, ``frozen`` a non-persistent buffer (the tensor as loaded)."""

    def __init__(self, owners, name: str, rows: torch.Tensor, readers=()):
        # owners: [(state-dict prefix, module)]; readers: other modules whose forward reads the attribute
        self.owners, self.name, self.rows = owners, name, rows
        first = owners[0][1]
        param = getattr(first, name)
        self.frozen_owner = first
        first.register_buffer(f"{name}_frozen", param.detach().clone(), persistent=False)
        first.register_parameter(f"{name}_new", nn.Parameter(param.detach()[rows].clone()))
        for module in {id(module): module for _, module in owners}.values():
            delattr(module, name)  # the Parameter; the attribute is recomputed from the two parts
            module.register_forward_pre_hook(self._refresh)
            setattr(module, name, self.full())
        for reader in readers:
            reader.register_forward_pre_hook(lambda _module, _inputs: self._refresh_owners())

    def _refresh_owners(self):
        for _, module in self.owners:
            setattr(module, self.name, self.full())

    @property
    def frozen(self):
        return getattr(self.frozen_owner, f"{self.name}_frozen")

    @property
    def new(self):
        return getattr(self.frozen_owner, f"{self.name}_new")

    def full(self) -> torch.Tensor:
        return self.frozen.index_put((self.rows,), self.new)

    def _refresh(self, module, inputs):
        setattr(module, self.name, self.full())

    def load(self, value: torch.Tensor) -> None:
        """Take a loaded full tensor: its rows ``rows`` into ``new``, all of it into ``frozen``."""
        with torch.no_grad():
            self.frozen.copy_(value)
            self.new.copy_(value[self.rows])
        for _, module in self.owners:
            setattr(module, self.name, self.full())


def freeze_for_adding(model) -> List[AddedRows]:
    """Freeze every parameter of ``model`` (built with ``--moe-add-langs``) but the new ones: the new
    experts, and, held apart by :class:`AddedRows`, the new tasks' gate rows and the new tags' embedding
    rows. Returns the :class:`AddedRows` (kept on the model as ``model.added_rows``). With
    ``--moe-add-train-all`` nothing is frozen (the baseline; returns ``[]``)."""
    args = model.args
    if getattr(args, "moe_add_train_all", False):
        return []
    for param in model.parameters():
        param.requires_grad_(False)
    freeze_experts = []
    num_experts = int(args.moe_expert_count)
    for side in learned_task_sides(args):
        for index, moe in _moe_layers(model, side):
            new = torch.arange(num_experts, len(moe.experts))
            if len(new):
                freeze_experts.append((f"{side}.layers.{index}.moe.experts.", moe, new))
    added = []
    from taskmoe_fairseq.modules.expert_feed_forward import STACKED_NAMES

    for keys, moe, new in freeze_experts:  # the new experts: rows E.. of the layer's stacked tensors
        for name in STACKED_NAMES:
            added.append(AddedRows([(keys, moe.experts)], name, new, readers=[moe]))
    router = model.encoder.moe_router
    for name, gate in router.gates.items():
        old_tasks = getattr(gate, "old_tasks", None)
        if old_tasks is not None:
            rows = torch.tensor([task for task, old in enumerate(old_tasks) if not old])
            added.append(AddedRows([(f"encoder.moe_router.gates.{name}.", gate)], "task_logits", rows))
    dictionary = model.encoder.dictionary
    rows = torch.tensor([_tag_index(dictionary, lang) for lang in added_langs(args)])
    by_param = {}
    for key in EMBEDDING_KEYS:
        module_path = key.rsplit(".", 1)[0]
        module = model.get_submodule(module_path)
        by_param.setdefault(id(module.weight), []).append((module_path + ".", module))
    for owners in by_param.values():
        added.append(AddedRows(owners, "weight", rows))
    model.added_rows = added
    return added


def combined_state_dict(model, state: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` as fairseq's layout has it: each :class:`AddedRows` tensor under its own
    name (``task_logits``, ``embed_tokens.weight``), its ``<name>_new`` part removed."""
    for added in getattr(model, "added_rows", []):
        full = added.full().detach()
        for path, _ in added.owners:  # one tensor under each name, shared as fairseq's own state dict shares it
            state[prefix + path + added.name] = full
            state.pop(prefix + path + added.name + "_new", None)
    return state


def split_loaded_state(model, state_dict: Dict[str, torch.Tensor]) -> None:
    """In place, before ``nn.Module.load_state_dict``: each :class:`AddedRows` tensor of a (grown)
    state dict goes into the frozen rows and the new ``Parameter``, its ``<name>_new`` key set."""
    for added in getattr(model, "added_rows", []):
        value = None
        for path, _ in added.owners:
            value = state_dict.pop(path + added.name, value)
        if value is None:
            continue
        added.load(value)
        for path, module in added.owners:  # a shared module is in the state dict under each of its names
            if module is added.frozen_owner:
                state_dict[path + added.name + "_new"] = value[added.rows].clone()


# ----------------------------------------------------------------------------- extraction of an old pair


def old_pair_model_parts(args, lang_pair: str):
    """For a pair of old languages of a grown model: the args and the vocabulary size of the sub-network
    as it was before adding (the old language list, no added languages or experts); None otherwise.
    Extraction then gives the old model's sub-network, tensor for tensor."""
    added = set(added_langs(args))
    if not added or set(lang_pair.split("-")) & added:
        return None
    import copy

    new_args = copy.deepcopy(args)
    new_args.taskmoe_langs = old_langs(args.taskmoe_langs, args)
    new_args.moe_add_langs = None
    new_args.moe_new_experts = 0
    new_args.moe_new_experts_init_from = None
    new_args.moe_add_train_all = False
    return new_args, len(added)
