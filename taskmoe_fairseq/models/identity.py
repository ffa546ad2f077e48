"""What a checkpoint's parameters mean, and the refusal to load them into a model that means
something else.

A checkpoint's *identity* is its language order and the options that fix its parameters' shapes
or what its gates compute. Where the model records it: its legacy config, ``cfg["model"]`` in the
checkpoint (``taskmoe_langs``, the ``--langs`` order ``build_model`` saved, and the MoE and size
options); a checkpoint without ``taskmoe_langs`` falls back to ``cfg["task"].langs``. Nothing new
is stored, so checkpoints written before these checks load as they did.

The language order is part of the model: language ids index the task gates (``--langs`` order),
and fairseq's multilingual dictionary appends the ``__xx__`` tags in that order, so another order
moves every tag to another embedding row. Appending languages at the end (the old order a prefix
of the new) is the one change allowed, and only by ``--moe-add-langs`` naming exactly the appended
languages (:mod:`taskmoe_fairseq.models.adding`).
"""

import argparse
from typing import List, Optional, Sequence

from taskmoe_fairseq.errors import usage_error

#: options that change parameter shapes or what the gates compute (``args`` name, flag)
MOE_OPTIONS = (
    "moe_expert_count", "moe_top_k",
    "encoder_moe_freq", "decoder_moe_freq",
    "encoder_moe_routing", "decoder_moe_routing",
    "moe_task_gate_weights",
)
#: what adding languages changes (shapes and which gate rows are old); compared on resume, not when adding
ADDING_OPTIONS = ("moe_add_langs", "moe_new_experts")
EXTRACTION_OPTIONS = ("moe_extracted_lang_pair", "moe_merged_experts")
SIZE_OPTIONS = (
    "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim", "decoder_ffn_embed_dim",
    "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
    "share_all_embeddings", "share_decoder_input_output_embed",
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def language_order_change(saved: Sequence[str], given: Sequence[str], allow_appended: bool = False) -> bool:
    """Whether ``given`` (this run's ``--langs``) differs from the model's ``saved`` order.

    ``allow_appended``: new languages at the end are no change (``saved`` a prefix of ``given``);
    passed only when ``--moe-add-langs`` adds them (:func:`check_same_model`)."""
    saved, given = list(saved), list(given)
    if allow_appended and given[: len(saved)] == saved:
        return False
    return saved != given


def check_language_order(saved: Sequence[str], given: Sequence[str], what: str = "the model",
                         allow_appended: bool = False) -> None:
    """Refuse a ``--langs`` order other than the model's (``allow_appended``: but for languages appended at its end).

    Raises:
        TaskMoeError: one line naming both orders and the fix.
    """
    if language_order_change(saved, given, allow_appended):
        raise usage_error(
            f"{what} was trained with --langs {','.join(saved)} but this run has --langs {','.join(given)}; "
            f"pass --langs {','.join(saved)} (language ids and the language tags' dictionary rows follow its order)"
        )


def language_tags(task_args) -> Optional[List]:
    """``[--encoder-langtok, --decoder-langtok]`` of a task's args (None without them): which tag
    the encoder reads (``tgt``: the paper's ``<2xx>``) and whether the decoder starts with one. Another
    scheme keeps every shape and changes what each input means, as another ``--langs`` order does."""
    if task_args is None or not hasattr(task_args, "encoder_langtok"):
        return None
    return [getattr(task_args, "encoder_langtok", None), bool(getattr(task_args, "decoder_langtok", False))]


def describe_tags(tags) -> str:
    encoder, decoder = tags
    return (f"--encoder-langtok {encoder}" if encoder else "no --encoder-langtok") + (
        " --decoder-langtok" if decoder else " and no --decoder-langtok")


def check_language_tags(saved, given, what: str = "the model") -> None:
    """Refuse a language-tag scheme other than the model's.

    Raises:
        TaskMoeError: one line naming both schemes and the fix.
    """
    if list(saved) != list(given):
        raise usage_error(f"{what} was trained with {describe_tags(saved)} but this run has {describe_tags(given)}; "
                          f"pass {describe_tags(saved)} (the tags are the task signal the model reads)")


def checkpoint_model_args(state: dict) -> Optional[argparse.Namespace]:
    """The model's legacy config in a loaded checkpoint ``state``, completed with the defaults
    ``TaskMoeTransformerModel.build_model`` fills in when it rebuilds the model (fairseq's
    ``load_model_ensemble``); None when ``state`` is not a ``taskmoe_transformer`` checkpoint."""
    from taskmoe_fairseq.models.checkpoint_config import is_taskmoe, saved_options
    from taskmoe_fairseq.models.taskmoe_transformer import taskmoe_base_architecture

    model, task = saved_options(state)
    if isinstance(model, dict):
        model = argparse.Namespace(**model)
    if not isinstance(model, argparse.Namespace) or not is_taskmoe(model):
        return None
    model = argparse.Namespace(**vars(model))
    taskmoe_base_architecture(model)
    if not getattr(model, "taskmoe_langs", None):
        langs = task.get("langs") if isinstance(task, dict) else getattr(task, "langs", None)
        model.taskmoe_langs = list(langs) if langs else None
    if getattr(model, "taskmoe_language_tags", None) is None:  # checkpoints from before the field: the task's
        model.taskmoe_language_tags = language_tags(argparse.Namespace(**task) if isinstance(task, dict) else task)
    return model


def as_option(name: str, value) -> str:
    """``--moe-expert-count 4``; a switch as ``--moe-merged-experts`` or ``no --moe-merged-experts``."""
    if value is None or value is False:
        return f"no {flag(name)}"
    return flag(name) if value is True else f"{flag(name)} {value}"


def adding_to(saved: argparse.Namespace, run: argparse.Namespace) -> bool:
    """Whether ``run`` adds languages to the checkpoint ``saved`` (``--moe-add-langs``, the checkpoint without them)."""
    return bool(getattr(run, "moe_add_langs", None)) and not getattr(saved, "moe_add_langs", None)


def option_differences(saved: argparse.Namespace, run: argparse.Namespace) -> List[str]:
    """Names of the identity options on which ``run`` differs from ``saved``.

    A dense checkpoint (no MoE layers) loaded into a model with experts is sparse upcycling's
    case (``--moe-upcycle``, :mod:`taskmoe_fairseq.models.upcycling` has its own one-line
    checks), so the MoE options are not compared there."""
    names = list(SIZE_OPTIONS) + list(EXTRACTION_OPTIONS)
    saved_dense = all(getattr(saved, f"{side}_moe_freq", 0) == 0 for side in ("encoder", "decoder"))
    run_dense = all(getattr(run, f"{side}_moe_freq", 0) == 0 for side in ("encoder", "decoder"))
    if not (saved_dense and not run_dense):
        names = list(MOE_OPTIONS) + names
    if not adding_to(saved, run):
        names += list(ADDING_OPTIONS)
    return [name for name in names if _value(saved, name) != _value(run, name)]


def _value(args, name):
    value = getattr(args, name, None)
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    if name in ADDING_OPTIONS and not value:
        return None  # no languages added: None, [] or 0, however stored
    return None if value is False or value == "" else value  # an unset switch or pair, however stored


def check_same_model(saved: argparse.Namespace, run: argparse.Namespace, path: str) -> None:
    """Refuse to load the checkpoint ``path`` (its model config ``saved``) into this run's model
    (``run``: the built model's ``args``), before fairseq's ``load_state_dict`` (whose size
    mismatch would be a traceback, and whose equal shapes would hide another meaning).

    Raises:
        TaskMoeError: another language order, or other MoE / size options; one line naming each
            option with the checkpoint's value and this run's.
    """
    saved_langs, run_langs = getattr(saved, "taskmoe_langs", None), getattr(run, "taskmoe_langs", None)
    if saved_langs and run_langs is not None:
        adding = adding_to(saved, run)
        if adding and list(run_langs) != list(saved_langs) + list(run.moe_add_langs):
            raise usage_error(
                f"{path} was trained with --langs {','.join(saved_langs)}; --moe-add-langs {','.join(run.moe_add_langs)} "
                f"needs --langs {','.join(list(saved_langs) + list(run.moe_add_langs))} (the new languages appended)"
            )
        check_language_order(saved_langs, run_langs, what=path, allow_appended=adding)
    saved_tags, run_tags = getattr(saved, "taskmoe_language_tags", None), getattr(run, "taskmoe_language_tags", None)
    if saved_tags is not None and run_tags is not None:
        check_language_tags(saved_tags, run_tags, what=path)
    differences = option_differences(saved, run)
    if differences:
        theirs = ", ".join(as_option(name, getattr(saved, name, None)) for name in differences)
        ours = ", ".join(as_option(name, getattr(run, name, None)) for name in differences)
        raise usage_error(
            f"{path} was trained with {theirs} but this run has {ours}; its parameters fit only the model it was "
            f"trained as: resume or fine-tune it with {theirs} (or train a new model in another --save-dir)"
        )
