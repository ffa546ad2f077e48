"""Strip the experts a language pair never uses: ``python -m taskmoe_fairseq.extract``.

For every task-routed or static MoE layer (Kudugunta et al., 2021, section 4:
"we can extract the sub-network for a task"), the gate is evaluated once for
the pair's task and only the k experts it selects are kept, with their gate
weights frozen in; token- and sentence-routed layers stay whole. The output is
an ordinary fairseq checkpoint for ``fairseq-generate``/``fairseq-interactive``
(same ``--user-dir``/``--task`` options, that pair's ``-s``/``-t``) and for
``--finetune-from-model``, and it translates exactly as the full model does.

Beside its output it writes the model's ``dict.<lang>.txt`` and ``spm.model``, copied from the
data folder the checkpoint records (or ``--data-dir``): fairseq's hub-archive layout, so
``taskmoe_fairseq.translate``/``serve`` and the hub work from that folder alone
(:mod:`taskmoe_fairseq.extract.assets`). The same file already there is kept; another one is refused
without ``--force``.

Examples::

    python -m taskmoe_fairseq.extract --checkpoint ckpt/checkpoint_best.pt --lang-pair en-de --output en-de.pt
    python -m taskmoe_fairseq.extract --checkpoint ckpt/checkpoint_best.pt --all-lang-pairs --output-dir serve/ --merge-experts
    python -m taskmoe_fairseq.extract --checkpoint ckpt/checkpoint_best.pt --all-lang-pairs --report-only
    python -m taskmoe_fairseq.extract --checkpoint ckpt/checkpoint_best.pt --lang-pair de-en --output de-en-k2.pt \
        --prune-token-experts 2 [--pruning-data valid|FILE] [--pruning-metric load|importance] [--pruning-sentences N]

``--prune-token-experts K`` also prunes every token-routed layer to the K experts the pair's
tokens use most on a sample of its own data (:mod:`taskmoe_fairseq.models.pruning`,
:mod:`taskmoe_fairseq.extract.pruning_data`): the result approximates the full model, and its
checkpoint (``moe_pruned_token_experts``) and report say so. See docs/pruning.md.
"""

import argparse
import copy
import glob
import json
import os
import sys
import types
from typing import List

import torch
from fairseq.data import Dictionary

from taskmoe_fairseq import safe_loading
from taskmoe_fairseq.expert_parallel import sharded_checkpoint, sharded_extraction
from taskmoe_fairseq.extract import assets
from taskmoe_fairseq.errors import run_cli, usage_error
from taskmoe_fairseq.files import atomic_write, check_replaceable
from taskmoe_fairseq.models.checkpoint_config import read_config
from taskmoe_fairseq.models.extraction import extractable_layers
from taskmoe_fairseq.models.pruning import METRICS, check_prune_request
from taskmoe_fairseq.modules import routing_kinds


def model_args(state: dict, path: str) -> argparse.Namespace:
    """The model's options of the full TaskMoE checkpoint ``state`` (or an expert-parallel ``-shared.pt``)
    read from ``path``: :func:`taskmoe_fairseq.models.checkpoint_config.read_config`, whose one-line
    errors it raises (not a fairseq or TaskMoE checkpoint, already extracted, an expert shard)."""
    return read_config(state, path, "extract", full=True, shared_file=True).model


def known_pairs(args) -> List[str]:
    pairs = args.lang_pairs
    return pairs.split(",") if isinstance(pairs, str) else list(pairs or [])


def zero_shot_note(args, pair: str, layers, pairs_known: List[str]):
    """A pair outside the training pairs: allowed where its task ids exist (source / target /
    static-source / static-target routing: each task was trained through other pairs); refused
    for pair routing, whose gate never saw the pair. Raises TaskMoeError; returns the note to print otherwise."""
    langs = list(args.taskmoe_langs)
    parts = pair.split("-")
    if len(parts) != 2 or not all(lang in langs for lang in parts) or parts[0] == parts[1]:
        raise usage_error(
            f"unknown language pair {pair}; the model knows {','.join(pairs_known)} "
            f"(and zero-shot pairs between its languages {','.join(langs)})"
        )
    by_pair = [routing_kinds.layer_name(side, index) for side, index, routing in layers if routing_kinds.task_key(routing) == "pair"]
    if by_pair:
        raise usage_error(
            f"{pair} is not a training pair and layers {','.join(by_pair)} route by language pair: their gate "
            f"never saw {pair}, so it has no sub-network; extract one of {','.join(pairs_known)}"
        )
    return (
        f"taskmoe_fairseq.extract: note: {pair} is zero-shot (not among the training pairs); its experts are "
        "those its source and target tasks were trained with"
    )


def _dictionary(size: int) -> Dictionary:
    """A dictionary of ``size`` symbols: the model needs only its size and special indices."""
    dictionary = Dictionary()
    while len(dictionary) < size:
        dictionary.add_symbol(f"<{len(dictionary)}>")
    return dictionary


def load_model(checkpoint: dict, args, partial: bool = False):
    """The full model of a checkpoint, built from its args and loaded with its weights
    (old layouts upgraded by the model's ``upgrade_state_dict_named``); ``partial``: the
    checkpoint lacks experts no requested pair keeps (read from expert shards)."""
    from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

    state = checkpoint["model"]
    source = _dictionary(state["encoder.embed_tokens.weight"].size(0))
    target = source if args.share_all_embeddings else _dictionary(state["decoder.embed_tokens.weight"].size(0))
    task = types.SimpleNamespace(
        source_dictionary=source, target_dictionary=target, langs=list(args.taskmoe_langs), provides_language_ids=True
    )
    if partial:
        return sharded_extraction.build_partial(TaskMoeTransformerModel, args, task, state)
    model = TaskMoeTransformerModel.build_model(copy.deepcopy(args), task)
    model.load_state_dict(state, strict=True)
    return model.eval()


def extracted_checkpoint(checkpoint: dict, model) -> dict:
    """The checkpoint of an extracted model: its args and weights, no optimizer state."""
    cfg = dict(checkpoint.get("cfg") or {})
    out = {key: value for key, value in checkpoint.items() if key not in ("model", "cfg", "args", "last_optimizer_state")}
    out["model"] = model.state_dict()
    if cfg:
        cfg["model"] = model.args
        cfg["task"] = task_config_for(cfg.get("task"), list(model.args.taskmoe_langs))
        out["cfg"] = cfg
    else:
        out["args"] = model.args
    return out


def task_config_for(task, langs):
    """The task config of an extracted checkpoint: the full model's, except that an old pair of a model that
    languages were added to (:mod:`taskmoe_fairseq.models.adding`) keeps the old ``--langs`` and the pairs
    between them, as the sub-network is the one from before adding."""
    if task is None:
        return task
    given = task.get("langs") if isinstance(task, dict) else getattr(task, "langs", None)
    if not given or list(given) == langs:
        return task
    pairs = task.get("lang_pairs") if isinstance(task, dict) else getattr(task, "lang_pairs", None)
    pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs or [])
    kept = [pair for pair in pairs if all(lang in langs for lang in pair.split("-"))]
    if isinstance(task, dict):
        return dict(task, langs=langs, lang_pairs=kept if not isinstance(task.get("lang_pairs"), str) else ",".join(kept))
    task = argparse.Namespace(**vars(task))
    task.langs = langs
    task.lang_pairs = ",".join(kept) if isinstance(getattr(task, "lang_pairs", None), str) else kept
    return task


def save_checkpoint(obj, path: str):
    atomic_write(path, lambda stream: torch.save(obj, stream))


def print_report(report: dict, stream=None):
    stream = stream or sys.stdout
    stream.write(
        f"\n{report['lang_pair']}: parameters {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.1%})"
    )
    if report.get("file_bytes_after"):
        stream.write(f", file {report['file_bytes_before'] / 2**20:.1f} MiB -> {report['file_bytes_after'] / 2**20:.1f} MiB")
    stream.write("\n")
    if report.get("approximate"):
        pruning = report["pruning"]
        stream.write(
            f"  APPROXIMATES the full model: token-routed layers keep {report['pruned_token_experts']} "
            f"expert{'s' if report['pruned_token_experts'] != 1 else ''} each, "
            f"chosen by {pruning['metric']} on {pruning['sentences']} sentences of {pruning['data']}\n"
        )
    stream.write(f"  {'layer':<12}{'routing':<16}{'experts':>10}  {'kept (gate weight | share of tokens)':<40}{'params':>24}\n")
    for row in report["layers"]:
        if "token_share" in row:  # pruned: each kept expert's share of the pair's top-k assignments
            kept = ", ".join(f"{e} ({w:.1%})" for e, w in zip(row["experts_kept"], row["token_share"]))
            kept += f" = {row['kept_share']:.1%}"
        else:
            kept = ", ".join(f"{e} ({w:.3f})" for e, w in zip(row["experts_kept"], row["gate_weights"]))
        stream.write(
            f"  {row['layer']:<12}{row['routing']:<16}{row['experts_before']:>4} -> {len(row['experts_kept']):<3}"
            f"  {kept:<40}{row['params_before']:>11,} -> {row['params_after']:<11,}\n"
        )


#: the options that tune --prune-token-experts (extract's and export's)
PRUNING_OPTIONS = ("pruning_data", "pruning_metric", "pruning_sentences")


def refuse_pruning_options_alone(options, needed: str) -> None:
    """One line for a ``--pruning-*`` option given without ``--prune-token-experts``.

    Raises:
        TaskMoeError: naming the first such option and ``--prune-token-experts NEEDED``.
    """
    if options.prune_token_experts is None:
        given = [name for name in PRUNING_OPTIONS if getattr(options, name) is not None]
        if given:
            raise usage_error(f"--{given[0].replace('_', '-')} needs --prune-token-experts {needed}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m taskmoe_fairseq.extract",
        description="Keep only the experts a language pair uses, in every task-routed or static MoE layer.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="full TaskMoE checkpoint, or the -shared.pt file of an expert-parallel one (never modified)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--lang-pair", action="append", metavar="SRC-TGT", help="a pair to extract; repeatable")
    which.add_argument("--lang-pairs", metavar="PAIRS", help="comma-separated pairs to extract")
    which.add_argument("--all-lang-pairs", action="store_true", help="every pair the model was trained on")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", help="output checkpoint (one pair)")
    where.add_argument("--output-dir", help="folder for one checkpoint per pair, named <pair>.pt")
    parser.add_argument("--merge-experts", action="store_true",
                        help="fold the k kept experts of each layer into one dense FFN of width k x FFN")
    parser.add_argument("--report-only", action="store_true", help="print the report; write nothing")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--data-dir", help="the binarized data the model was trained on, whose dict.<lang>.txt and spm.model "
                        "are copied beside the output (default: the folder the checkpoint records)")
    parser.add_argument("--plain-copy", action="store_true",
                        help="for a model with no task-routed or static layer, write an unchanged copy instead of failing")
    prune = parser.add_argument_group("pruning token-routed layers (approximate; see docs/pruning.md)")
    prune.add_argument("--prune-token-experts", type=int, metavar="K",
                       help="keep in every token-routed layer the K experts the pair's tokens use most, the gate "
                            "renormalised over them (1: a dense FFN); the result approximates the full model")
    prune.add_argument("--pruning-data", metavar="SPLIT_OR_FILE",
                       help="the pair's sample: a split of the data folder (default valid) or a text file of source "
                            "sentences (encoder token routing only)")
    prune.add_argument("--pruning-metric", choices=METRICS,
                       help="load: share of the gate's top-k assignments (default); importance: summed gate probability")
    prune.add_argument("--pruning-sentences", type=int, metavar="N", help="sentences of the sample (default 1000)")
    options = parser.parse_args(argv)
    refuse_pruning_options_alone(options, "K (the experts to keep per token-routed layer)")
    return pruning_defaults(options)


def pruning_defaults(options):
    """``options`` with the ``--pruning-*`` options not given set to their defaults (valid, load, 1000)."""
    options.pruning_data = options.pruning_data or "valid"
    options.pruning_metric = options.pruning_metric or "load"
    options.pruning_sentences = 1000 if options.pruning_sentences is None else options.pruning_sentences
    return options


def output_paths(options, pairs: List[str]) -> List[str]:
    """Where each pair goes; every problem with a path is one line, before anything is read or written."""
    if options.report_only:
        return [None] * len(pairs)
    if len(pairs) > 1 and not options.output_dir:
        raise usage_error(f"{len(pairs)} pairs need --output-dir (one <pair>.pt each), not --output")
    if not options.output and not options.output_dir:
        raise usage_error("say where to write: --output FILE (one pair) or --output-dir DIR")
    if options.output_dir and os.path.exists(options.output_dir) and not os.path.isdir(options.output_dir):
        raise usage_error(f"--output-dir {options.output_dir} is a file; pass a folder")
    paths = [options.output] if options.output else [os.path.join(options.output_dir, f"{pair}.pt") for pair in pairs]
    inputs = input_files(options.checkpoint)
    option = "--output" if options.output else "--output-dir"
    for path in paths:
        if os.path.isdir(path):
            raise usage_error(f"{path} is a folder; pass a file name with --output, or use --output-dir")
        for written in (path, report_path(path)):
            if os.path.realpath(written) in inputs:
                raise usage_error(f"{written} is the input checkpoint, which is never modified; choose another output")
            check_replaceable(written, f"{option} file")
            if os.path.exists(written) and not options.force:
                raise usage_error(f"{written} exists; pass --force to overwrite it")
        if os.path.exists(report_path(path)) and not is_report(report_path(path)):
            raise usage_error(
                f"{report_path(path)} exists and is not a report extract wrote; --force replaces only extract's "
                "own outputs: move it away or choose another output name"
            )
    return paths


def report_path(path: str) -> str:
    """The report written beside the checkpoint ``path``: ``en-de.pt`` -> ``en-de.report.json``."""
    return os.path.splitext(path)[0] + ".report.json"


def is_report(path: str) -> bool:
    """Whether ``path`` is a JSON report of this command (what ``--force`` may replace beside a checkpoint)."""
    try:
        with open(path, encoding="utf-8") as stream:
            report = json.load(stream)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"lang_pair", "source_checkpoint", "layers"} <= set(report)


def input_files(checkpoint: str) -> set:
    """The real paths extraction reads: the checkpoint, and beside a ``-shared.pt`` file its expert shards."""
    inputs = {os.path.realpath(checkpoint)}
    stem = sharded_checkpoint.stem_of(checkpoint)
    if stem is not None:
        inputs.update(os.path.realpath(path) for path in glob.glob(glob.escape(stem) + "-rank-*.pt"))
    return inputs


def refuse_data_folder_outputs(paths, data_dir):
    """The data folder the dictionaries are read from is an input too: no output (a checkpoint or its
    report) may be one of its files, --force or not."""
    if not data_dir or not os.path.isdir(data_dir):
        return
    inputs = {os.path.realpath(os.path.join(data_dir, name)) for name in os.listdir(data_dir)}
    for path in paths:
        for written in (path, report_path(path)) if path else ():
            if os.path.realpath(written) in inputs:
                raise usage_error(f"{written} is a file of the data folder {data_dir}, which extract reads and never "
                                  "modifies; choose another output")


def pruning_samples(options, checkpoint: dict, args, pairs: List[str]) -> dict:
    """pair -> ``(batches, description)`` of each pair's pruning sample
    (:func:`taskmoe_fairseq.extract.pruning_data.pair_sample`), all read before anything is written."""
    from taskmoe_fairseq.extract import pruning_data

    data_dir = options.data_dir or assets.recorded_data_dir(checkpoint)
    if not data_dir or not os.path.isdir(data_dir):
        raise usage_error(
            f"--prune-token-experts needs the pair's data, but the data folder {data_dir!r} is not there; pass --data-dir"
        )
    return {
        pair: pruning_data.pair_sample(checkpoint, pair, os.path.abspath(data_dir), options.pruning_data, options.pruning_sentences)
        for pair in pairs
    }


def extracted_models(model, pairs: List[str], merge: bool, prune=None, samples=None, metric: str = "load"):
    """``(pair, sub-network, report rows)`` for each of ``pairs`` in turn, from the full ``model``
    (:func:`load_model`): ``model.prune_token_experts`` with ``prune`` (K) on each pair's sample
    (``samples``: :func:`pruning_samples`), else ``model.extract`` where a layer is task-routed or
    static, else ``model`` itself. A generator: one sub-network at a time is alive.

    Raises:
        TaskMoeError: as ``extract`` / ``prune_token_experts`` (e.g. a pair-routed layer and a zero-shot pair).
    """
    layers = extractable_layers(model.args)
    for pair in pairs:
        if prune is not None:
            extracted, rows = model.prune_token_experts(pair, samples[pair][0], prune, metric, merge=merge)
        elif layers:
            extracted, rows = model.extract(pair, merge=merge)
        else:
            extracted, rows = model, []
        yield pair, extracted, rows


def run(options) -> List[dict]:
    checkpoint = safe_loading.safe_torch_load(options.checkpoint, mmap=True)
    args = model_args(checkpoint, options.checkpoint)
    pairs_known = known_pairs(args)
    pairs = pairs_known if options.all_lang_pairs else (options.lang_pair or options.lang_pairs.split(","))
    layers = extractable_layers(args)
    prune = options.prune_token_experts
    if prune is not None:
        check_prune_request(args, prune)
        if options.pruning_sentences < 1:
            raise usage_error(f"--pruning-sentences must be at least 1, got {options.pruning_sentences}")
    notes = [zero_shot_note(args, pair, layers, pairs_known) for pair in pairs if pair not in pairs_known]
    paths = output_paths(options, pairs)
    refuse_data_folder_outputs(paths, options.data_dir or assets.recorded_data_dir(checkpoint))
    data_files = assets.plan_beside_outputs(checkpoint, args, paths, options.data_dir, options.force)
    samples = pruning_samples(options, checkpoint, args, pairs) if prune is not None else {}
    for note in notes:  # after every check that can refuse the request: an error stays one line
        print(note, file=sys.stderr)

    if not layers and prune is None:
        routings = f"{args.encoder_moe_routing}/{args.decoder_moe_routing}"
        message = (
            f"{options.checkpoint}: nothing to strip: no MoE layer is task-routed or static "
            f"(encoder/decoder routing {routings}, every token may use every expert)"
        )
        if not options.plain_copy:
            raise usage_error(message + "; pass --plain-copy to write an unchanged copy")
        print(message + "; writing unchanged copies", file=sys.stderr)

    file_bytes, shards = os.path.getsize(options.checkpoint), None
    if sharded_extraction.is_sharded(checkpoint):
        checkpoint, shards, file_bytes = sharded_extraction.read(options.checkpoint, checkpoint, args, pairs, layers)
        args = model_args(checkpoint, options.checkpoint)
        print(f"taskmoe_fairseq.extract: read expert shards {shards} of {options.checkpoint}", file=sys.stderr)
    # pruning runs the model on data: every expert is needed (a token-routed layer made every shard read)
    model = load_model(checkpoint, args, partial=shards is not None and prune is None)
    params_before = sum(p.numel() for p in model.state_dict().values())
    reports = []
    extracted_all = extracted_models(model, pairs, options.merge_experts, prune, samples, options.pruning_metric)
    for (pair, extracted, rows), path in zip(extracted_all, paths):
        report = {
            "lang_pair": pair,
            "source_checkpoint": os.path.abspath(options.checkpoint),
            "merge_experts": bool(options.merge_experts),
            "params_before": params_before,
            "params_after": sum(p.numel() for p in extracted.state_dict().values()),
            "file_bytes_before": file_bytes,
            "expert_shards_read": shards,
            "approximate": prune is not None,
            "pruned_token_experts": prune,
            "layers": rows,
        }
        if prune is not None:
            report["pruning"] = dict(samples[pair][1], metric=options.pruning_metric)
        if path is not None:
            save_checkpoint(extracted_checkpoint(checkpoint, extracted), path)
            report["output"] = os.path.abspath(path)
            report["file_bytes_after"] = os.path.getsize(path)
            atomic_write(report_path(path), (json.dumps(report, indent=2) + "\n").encode())
        print_report(report)
        reports.append(report)
    assets.write_copies(data_files)  # the model's dictionaries and spm.model: the outputs work without the data folder
    return reports


def main(argv=None):
    return run_cli("taskmoe_fairseq.extract", lambda a: run(parse_args(a)) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
