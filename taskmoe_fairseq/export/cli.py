"""``python -m taskmoe_fairseq.export``: a TaskMoE sub-network as a CTranslate2 model.

Examples::

    python -m taskmoe_fairseq.export --checkpoint ckpt/checkpoint_best.pt --lang-pair en-de \\
        --format ctranslate2 --output-dir serve/ct2-en-de
    python -m taskmoe_fairseq.export --checkpoint ckpt/checkpoint_best.pt --all-lang-pairs \\
        --format ctranslate2 --quantization int8 --output-dir serve/ct2   # one folder per pair

Given a full checkpoint it extracts and merges each pair's sub-network first, in this process
(what the extract CLI writes with ``--merge-experts``); given an extracted one it exports that pair. The output folder
holds CTranslate2's files (``model.bin``, ``config.json``, vocabularies), ``spm.model`` and
``taskmoe_export.json`` (tags, prefix, end token: see :mod:`.conventions`). It is built in a
temporary folder beside ``--output-dir`` and renamed into place, so it is complete or absent.
"""

import argparse
import errno
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List

from taskmoe_fairseq.errors import TaskMoeError, usage_error
from taskmoe_fairseq.extract.cli import PRUNING_OPTIONS, pruning_defaults, refuse_pruning_options_alone
from taskmoe_fairseq.files import atomic_copy, atomic_move, atomic_write_text, write_error

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m taskmoe_fairseq.export",
        description="Export TaskMoE sub-networks (one per language pair) to CTranslate2.",
    )
    parser.add_argument("--checkpoint", required=True, help="full or extracted TaskMoE checkpoint (never modified)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--lang-pair", action="append", default=[], metavar="SRC-TGT", help="a pair to export; repeatable")
    which.add_argument("--all-lang-pairs", action="store_true", help="every pair the model was trained on")
    parser.add_argument("--format", default="ctranslate2", choices=("ctranslate2",), help="output format")
    parser.add_argument("--output-dir", required=True,
                        help="the model folder (one pair), or a folder of <pair>/ model folders (several pairs)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="CTranslate2 weight type (default: the checkpoint's, float32)")
    parser.add_argument("--data-dir", help="the binarized data folder with the dictionaries (default: the checkpoint's own "
                        "folder when extract put them there, else the one recorded in the checkpoint)")
    parser.add_argument("--spm-model", help="SentencePiece model to ship (default: DATA_DIR/spm.model)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output-dir")
    prune = parser.add_argument_group("approximate export of token-routed models (see docs/pruning.md)")
    prune.add_argument("--prune-token-experts", type=int, metavar="1",
                       help="prune every token-routed layer to the one expert the pair's tokens use most (extract "
                            "--prune-token-experts 1): a dense Transformer that approximates the full model")
    prune.add_argument("--pruning-data", metavar="SPLIT_OR_FILE", help="as extract's (default valid)")
    prune.add_argument("--pruning-metric", choices=("load", "importance"), help="as extract's (default load)")
    prune.add_argument("--pruning-sentences", type=int, metavar="N", help="as extract's (default 1000)")
    options = parser.parse_args(argv)
    refuse_pruning_options_alone(options, "1")
    return options


def pruning_options(options, data_dir: str):
    """Extract's pruning options for :func:`~taskmoe_fairseq.export.checkpoints.merged_subnetworks`
    (its defaults where not given; the samples come from ``data_dir``); None without ``--prune-token-experts``."""
    if options.prune_token_experts is None:
        return None
    given = {name: getattr(options, name) for name in PRUNING_OPTIONS}
    return pruning_defaults(argparse.Namespace(prune_token_experts=options.prune_token_experts, data_dir=data_dir, **given))


def resolve_inputs(options, loaded):
    from taskmoe_fairseq.extract import assets

    # --data-dir, else the dictionaries beside the checkpoint (an extracted one), else the training data folder
    recorded = getattr(loaded.task_args, "data", None)
    data_dir = assets.data_dir_for(loaded.path, recorded, assets.model_languages(loaded.args)[0], options.data_dir)
    spm = options.spm_model or os.path.join(data_dir, "spm.model")
    if not os.path.isfile(spm):
        raise usage_error(f"SentencePiece model {spm} not found; pass --spm-model")
    return data_dir, spm


# what export writes into a model folder: CTranslate2's files, the SentencePiece model, the conventions
EXPORT_FILES = frozenset({
    "model.bin", "config.json", "vmap.txt", "spm.model", "taskmoe_export.json",
    *(f"{side}_vocabulary.{ext}" for side in ("shared", "source", "target") for ext in ("json", "txt")),
})


def _not_exported(folder: str) -> List[str]:
    """The entries of ``folder`` that export did not write: none for an empty folder, a model folder
    (``taskmoe_export.json`` and only :data:`EXPORT_FILES`) or a folder of ``<pair>/`` model folders."""
    entries = sorted(os.listdir(folder))
    if not entries:
        return []
    if "taskmoe_export.json" in entries:
        return [os.path.join(folder, name) for name in entries
                if name not in EXPORT_FILES or not os.path.isfile(os.path.join(folder, name))
                or os.path.islink(os.path.join(folder, name))]
    foreign = []
    for name in entries:
        sub = os.path.join(folder, name)
        if os.path.islink(sub) or not os.path.isdir(sub) or "-" not in name or "taskmoe_export.json" not in os.listdir(sub):
            foreign.append(sub)
        else:
            foreign.extend(_not_exported(sub))
    return foreign


def check_output(path: str, force: bool, checkpoint: str) -> str:
    """The absolute ``--output-dir``; refuses (one line), before anything is read or written, a path
    that exists without ``--force``, is not a real folder, holds the ``checkpoint``, or holds anything
    an earlier export did not write (``--force`` replaces only that)."""
    path = os.path.abspath(path)
    if os.path.islink(path):
        raise usage_error(f"--output-dir {path} is a symbolic link; pass the folder it points to, or a new path")
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise usage_error(f"--output-dir {path} exists and is not a folder; choose a new path")
        if not force:
            raise usage_error(f"{path} exists; pass --force to replace it")
        check_inputs_outside(path, {"--checkpoint": checkpoint})
        foreign = _not_exported(path)
        if foreign:
            raise usage_error(
                f"--output-dir {path} holds {foreign[0]}, which export did not write; --force replaces only an "
                "earlier export's folder: choose a new or empty folder"
            )
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise usage_error(f"cannot create {parent} ({error.strerror}); choose a writable --output-dir") from None
    if not os.access(parent, os.W_OK):
        raise usage_error(f"cannot write to {parent}; choose a writable --output-dir")
    return path


def check_inputs_outside(output: str, inputs: Dict[str, str]):
    """Refuse an ``--output-dir`` that is or holds one of the ``inputs`` (``{option: path}``): it is replaced whole."""
    real_output = os.path.realpath(output)
    for option, path in inputs.items():
        real = os.path.realpath(path)
        if real == real_output or real.startswith(real_output + os.sep):
            raise usage_error(
                f"--output-dir {output} holds the input {path} ({option}), which is never modified; "
                "choose another --output-dir"
            )


def write_pair(state, args, task_args, pair: str, data_dir: str, spm: str, folder: str, quantization, source: str) -> Dict:
    """Convert one sub-network into ``folder`` (created); returns its conventions."""
    import ctranslate2

    from taskmoe_fairseq.export.conventions import CONVENTIONS_FILE, SPM_FILE, conventions, task_dictionaries
    from taskmoe_fairseq.export.ct2_spec import TaskMoeCt2Converter, layer_summary
    from taskmoe_fairseq.export.subnetwork import build_subnetwork, is_exact

    network = build_subnetwork(state, args, source)
    source_symbols, target_symbols = task_dictionaries(task_args, data_dir, pair)
    conv = conventions(pair, task_args, source_symbols, target_symbols)
    try:
        TaskMoeCt2Converter(network, source_symbols, target_symbols).convert(folder, quantization=quantization, force=True)
    except TaskMoeError:
        raise
    except (ValueError, RuntimeError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise usage_error(f"CTranslate2 rejected the {pair} model: {first}") from None
    atomic_copy(spm, os.path.join(folder, SPM_FILE))
    conv.update(
        format="ctranslate2",
        ctranslate2_version=ctranslate2.__version__,
        quantization=quantization or "float32",
        source_checkpoint=os.path.abspath(source),
        extracted=bool(getattr(args, "moe_extracted_lang_pair", None)),
        exact=is_exact(args),
        pruned_token_experts=getattr(args, "moe_pruned_token_experts", None),
        routing={"encoder": getattr(args, "encoder_moe_routing", None), "decoder": getattr(args, "decoder_moe_routing", None)},
        layers=layer_summary(network),
    )
    atomic_write_text(os.path.join(folder, CONVENTIONS_FILE), json.dumps(conv, indent=2) + "\n")
    return conv


def run(options) -> List[str]:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        raise usage_error("CTranslate2 is not installed: pip install 'taskmoe-fairseq[ctranslate2]' (or ctranslate2)") from None
    from taskmoe_fairseq.export import checkpoints

    output = check_output(options.output_dir, options.force, options.checkpoint)
    loaded = checkpoints.load(options.checkpoint)
    pairs = checkpoints.choose_pairs(loaded, options.lang_pair, options.all_lang_pairs)
    checkpoints.refuse_routed_layers(loaded, options.prune_token_experts)
    data_dir, spm = resolve_inputs(options, loaded)
    check_inputs_outside(output, {"--checkpoint": options.checkpoint, "--data-dir": data_dir, "--spm-model": spm})

    try:
        return build(options, loaded, pairs, data_dir, spm, output, pruning_options(options, data_dir))
    except OSError as error:
        # CTranslate2 writes model.bin and its vocabularies with open(); the folders are made here
        written = os.path.abspath(error.filename) if isinstance(error.filename, str) else None
        if error.errno in WRITE_ERRNOS or (written and written.startswith(os.path.dirname(output) + os.sep)):
            raise write_error(written or output, error) from None
        raise


# the causes of a failed write: disk full, quota, file-size limit, I/O error, read-only file system
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def build(options, loaded, pairs, data_dir, spm, output, pruning=None) -> List[str]:
    """Convert ``pairs`` in a temporary folder beside ``output`` and rename it into place; a full
    checkpoint's merged sub-networks are extracted in this process (``pruning``: see
    :func:`~taskmoe_fairseq.export.checkpoints.merged_subnetworks`)."""
    from taskmoe_fairseq.export import checkpoints

    several = len(pairs) > 1 or options.all_lang_pairs
    building = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.building-", dir=os.path.dirname(output))
    try:
        if loaded.extracted_pair or not loaded.has_moe_layers():
            networks = ((pair, loaded.state, loaded.args) for pair in pairs)  # already a sub-network, or dense
        else:
            networks = checkpoints.merged_subnetworks(loaded, pairs, pruning)
            print(f"extracting {','.join(pairs)} (merged experts) ...", file=sys.stderr, flush=True)
        written = []
        for pair, state, args in networks:
            folder = os.path.join(building, pair) if several else os.path.join(building, "model")
            conv = write_pair(state, args, loaded.task_args, pair, data_dir, spm, folder, options.quantization, loaded.path)
            written.append(pair)
            if not conv["exact"]:
                print(f"{pair}: note: the export is not exact: its token-routed layers were pruned to "
                      f"{conv['pruned_token_experts']} expert chosen on the pair's data, so it approximates the full model",
                      file=sys.stderr, flush=True)
            state = None
            print(f"{pair}: converted", file=sys.stderr, flush=True)
        final_tree = building if several else os.path.join(building, "model")
        replace_folder(final_tree, output)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for pair in written:
        print(os.path.join(output, pair) if several else output)
    return written


def replace_folder(new: str, target: str):
    """Rename ``new`` to ``target``; an existing ``target`` (``--force``) is moved aside first
    and removed only after the new folder is in place."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
    try:
        atomic_move(new, target)
    except OSError:
        if old:
            os.rename(old, target)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except TaskMoeError as error:
        print(f"taskmoe_fairseq.export: error: {error.message}", file=sys.stderr)
        return 2
    return 0
