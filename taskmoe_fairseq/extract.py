"""Strip the experts a language pair never uses: ``python -m taskmoe_fairseq.extract``.

For every task-routed or static MoE layer (Kudugunta et al., 2021, section 4:
"we can extract the sub-network for a task"), the gate is evaluated once for
the pair's task and only the k experts it selects are kept, with their gate
weights frozen in; token- and sentence-routed layers stay whole. The output is
an ordinary fairseq checkpoint for ``fairseq-generate``/``fairseq-interactive``
(same ``--user-dir``/``--task`` options, that pair's ``-s``/``-t``) and for
``--finetune-from-model``, and it translates exactly as the full model does.

Examples::

    python -m taskmoe_fairseq.extract --checkpoint ckpt/checkpoint_best.pt --lang-pair en-de --output en-de.pt
    python -m taskmoe_fairseq.extract --checkpoint ckpt/checkpoint_best.pt --all-lang-pairs --output-dir serve/ --merge-experts
    python -m taskmoe_fairseq.extract --checkpoint ckpt/checkpoint_best.pt --all-lang-pairs --report-only
"""

import argparse
import copy
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional

import torch

from taskmoe_fairseq import compat
from taskmoe_fairseq.errors import TaskMoeUsageError, usage_error
from taskmoe_fairseq.models.moe_options import SIDES, is_moe_layer
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.modules.static_gate import StaticTaskGate
from taskmoe_fairseq.modules.task_gate import TaskGate

EXPERT_PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def model_args(state: dict, path: str) -> argparse.Namespace:
    """The model's legacy config of a fairseq checkpoint, if it is a TaskMoE model."""
    if not isinstance(state, dict) or "model" not in state:
        raise usage_error(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    cfg = state.get("cfg") or {}
    args = cfg.get("model") if isinstance(cfg, dict) else None
    args = args if args is not None else state.get("args")
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    if args is None or not str(arch).startswith("taskmoe_transformer"):
        raise usage_error(
            f"{path}: not a TaskMoE checkpoint (architecture {arch!r}); extract works on models "
            "trained with --arch taskmoe_transformer"
        )
    if getattr(args, "moe_extracted_lang_pair", None):
        raise usage_error(
            f"{path}: already extracted for {args.moe_extracted_lang_pair}; extract from the full checkpoint"
        )
    return args


def known_pairs(args) -> List[str]:
    pairs = args.lang_pairs
    return pairs.split(",") if isinstance(pairs, str) else list(pairs or [])


def extractable_layers(args) -> List[tuple]:
    """``(side, layer index, routing)`` of every task-routed or static MoE layer."""
    layers = []
    for side in SIDES:
        routing = getattr(args, f"{side}_moe_routing")
        if not routing_kinds.is_extractable(routing):
            continue
        for index in range(getattr(args, f"{side}_layers")):
            if is_moe_layer(args, side, index):
                layers.append((side, index, routing))
    return layers


def route_pair(args, model_state: dict, prefix: str, routing: str, pair: str):
    """The experts ``[K]`` and weights ``[K]`` (float32) the layer's gate gives ``pair``,
    computed by the same gate code the model runs."""
    langs = list(args.taskmoe_langs)
    src, tgt = pair.split("-")
    key = routing_kinds.task_key(routing)
    task = routing_kinds.task_ids(key, torch.tensor([langs.index(src)]), torch.tensor([langs.index(tgt)]), len(langs))
    if routing_kinds.is_static(routing):
        weights, index = StaticTaskGate(args.moe_expert_count, args.moe_top_k).route_tasks(task)
    else:
        gate = TaskGate(routing_kinds.num_tasks(key, len(langs)), args.moe_expert_count, args.moe_top_k)
        gate.load_state_dict({"task_logits": model_state[prefix + "gate.task_logits"]})
        with torch.no_grad():
            _, weights, index = gate.route_tasks(task)
    return index[0], weights[0].float()


def merge_experts(experts: List[Dict[str, torch.Tensor]], weights: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One expert of width ``k * ffn`` equal to ``sum_k w_k * expert_k`` (exact in real arithmetic)."""
    dtype = experts[0]["fc2.weight"].dtype
    scale = [weight.to(dtype) for weight in weights]
    return {
        "fc1.weight": torch.cat([expert["fc1.weight"] for expert in experts], dim=0),
        "fc1.bias": torch.cat([expert["fc1.bias"] for expert in experts], dim=0),
        "fc2.weight": torch.cat([w * expert["fc2.weight"] for w, expert in zip(scale, experts)], dim=1),
        "fc2.bias": sum(w * expert["fc2.bias"] for w, expert in zip(scale, experts)),
    }


def extract_pair(args, model_state: dict, pair: str, merge: bool):
    """The sub-network state dict for ``pair`` and one report row per extracted layer."""
    layers = extractable_layers(args)
    prefixes = [f"{side}.layers.{index}.moe." for side, index, _ in layers]
    state = {key: value for key, value in model_state.items() if not key.startswith(tuple(prefixes))}
    rows = []
    for (side, index, routing), prefix in zip(layers, prefixes):
        experts, gate_weights = route_pair(args, model_state, prefix, routing, pair)
        kept = [{name: model_state[f"{prefix}experts.{int(e)}.{name}"] for name in EXPERT_PARAMS} for e in experts]
        weights = gate_weights
        if merge:
            kept, weights = [merge_experts(kept, gate_weights)], torch.ones(1)
        for slot, expert in enumerate(kept):
            for name, tensor in expert.items():
                # clone: saving a view would write the full model's storage
                state[f"{prefix}experts.{slot}.{name}"] = tensor.clone()
        state[prefix + "expert_weights"] = weights.clone()
        rows.append(
            {
                "layer": f"{side}.{index}",
                "routing": routing,
                "experts_before": args.moe_expert_count,
                "experts_kept": [int(e) for e in experts],
                "gate_weights": [round(float(w), 6) for w in gate_weights],
                "params_before": sum(t.numel() for k, t in model_state.items() if k.startswith(prefix)),
                "params_after": sum(t.numel() for k, t in state.items() if k.startswith(prefix)),
            }
        )
    return state, rows


def extracted_checkpoint(checkpoint: dict, args, model_state: dict, pair: Optional[str], merge: bool) -> dict:
    new_args = copy.deepcopy(args)
    new_args.moe_extracted_lang_pair = pair
    new_args.moe_merged_experts = bool(merge and pair)
    cfg = dict(checkpoint.get("cfg") or {})
    if cfg:
        cfg["model"] = new_args
    out = {key: value for key, value in checkpoint.items() if key not in ("model", "cfg", "args", "last_optimizer_state")}
    out["model"] = model_state
    if cfg:
        out["cfg"] = cfg
    else:
        out["args"] = new_args
    return out


def atomic_torch_save(obj, path: str, force: bool):
    if os.path.exists(path) and not force:
        raise usage_error(f"{path} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".extract-", suffix=".tmp", dir=folder)
    except OSError as error:
        raise usage_error(f"cannot write to {folder} ({error.strerror}); choose a writable --output/--output-dir") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            if isinstance(obj, (bytes, str)):
                stream.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, stream)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def count_params(state: dict) -> int:
    return sum(t.numel() for t in state.values() if torch.is_tensor(t))


def print_report(report: dict, stream=None):
    stream = stream or sys.stdout
    stream.write(
        f"\n{report['lang_pair']}: parameters {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.1%})"
    )
    if report.get("file_bytes_after"):
        stream.write(f", file {report['file_bytes_before'] / 2**20:.1f} MiB -> {report['file_bytes_after'] / 2**20:.1f} MiB")
    stream.write("\n")
    stream.write(f"  {'layer':<12}{'routing':<16}{'experts':>10}  {'kept (gate weight)':<40}{'params':>24}\n")
    for row in report["layers"]:
        kept = ", ".join(f"{e} ({w:.3f})" for e, w in zip(row["experts_kept"], row["gate_weights"]))
        stream.write(
            f"  {row['layer']:<12}{row['routing']:<16}{row['experts_before']:>4} -> {len(row['experts_kept']):<3}"
            f"  {kept:<40}{row['params_before']:>11,} -> {row['params_after']:<11,}\n"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m taskmoe_fairseq.extract",
        description="Keep only the experts a language pair uses, in every task-routed or static MoE layer.",
    )
    parser.add_argument("--checkpoint", required=True, help="full TaskMoE checkpoint (never modified)")
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
    parser.add_argument("--plain-copy", action="store_true",
                        help="for a model with no task-routed or static layer, write an unchanged copy instead of failing")
    return parser.parse_args(argv)


def run(options) -> List[dict]:
    checkpoint = compat.safe_torch_load(options.checkpoint)
    args = model_args(checkpoint, options.checkpoint)
    pairs_known = known_pairs(args)
    if options.all_lang_pairs:
        pairs = pairs_known
    else:
        pairs = options.lang_pair or options.lang_pairs.split(",")
    unknown = [pair for pair in pairs if pair not in pairs_known]
    if unknown:
        raise usage_error(f"unknown language pair {','.join(unknown)}; the model knows {','.join(pairs_known)}")
    if not options.report_only:
        if len(pairs) > 1 and not options.output_dir:
            raise usage_error(f"{len(pairs)} pairs need --output-dir (one <pair>.pt each), not --output")
        if not options.output and not options.output_dir:
            raise usage_error("say where to write: --output FILE (one pair) or --output-dir DIR")

    layers = extractable_layers(args)
    if not layers:
        routings = f"{args.encoder_moe_routing}/{args.decoder_moe_routing}"
        message = (
            f"{options.checkpoint}: nothing to strip: no MoE layer is task-routed or static "
            f"(encoder/decoder routing {routings}, every token may use every expert)"
        )
        if not options.plain_copy:
            raise usage_error(message + "; pass --plain-copy to write an unchanged copy")
        print(message + "; writing unchanged copies", file=sys.stderr)

    model_state = checkpoint["model"]
    file_bytes = os.path.getsize(options.checkpoint)
    reports = []
    for pair in pairs:
        if layers:
            state, rows = extract_pair(args, model_state, pair, options.merge_experts)
        else:
            state, rows = model_state, []
        report = {
            "lang_pair": pair,
            "source_checkpoint": os.path.abspath(options.checkpoint),
            "merge_experts": bool(options.merge_experts),
            "params_before": count_params(model_state),
            "params_after": count_params(state),
            "file_bytes_before": file_bytes,
            "layers": rows,
        }
        if not options.report_only:
            output = options.output or os.path.join(options.output_dir, f"{pair}.pt")
            atomic_torch_save(extracted_checkpoint(checkpoint, args, state, pair if layers else None, options.merge_experts), output, options.force)
            report["output"] = os.path.abspath(output)
            report["file_bytes_after"] = os.path.getsize(output)
            atomic_torch_save(json.dumps(report, indent=2) + "\n", os.path.splitext(output)[0] + ".report.json", True)
        print_report(report)
        reports.append(report)
    return reports


def main(argv=None):
    try:
        run(parse_args(argv))
    except TaskMoeUsageError as error:
        print(f"taskmoe_fairseq.extract: error: {error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
