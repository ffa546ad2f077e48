"""Task-gate diagnostics over training (issue #12): read a series of checkpoints of one run and
write, for every task-routed layer, each task's gate distribution, its top-k expert set and top-1
probability at every checkpoint, how many tasks changed their expert set between consecutive
checkpoints, and how many experts the languages share. Nothing is trained or decoded: a task gate
is a table of ``[num_tasks, E]`` logits (``taskmoe_fairseq/modules/task_gate.py``), so a
checkpoint holds each task's routing exactly.

Usage::

    python examples/measure_gates.py --name NAME --out docs/quickstart/gates.json CKPT_200.pt CKPT_400.pt ...
    python examples/report_gates.py docs/quickstart/gates*.json --out docs/quickstart/gates.md

Checkpoints are read with the plugin's safe loader (``weights_only`` plus its allow-list); the
run's routing, languages and pairs come from the checkpoint's own config. Static and sentence
routings have no learned task table and are skipped; token-routed layers are not task-level.
"""

import argparse
import itertools
import json
import os
import shlex
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from taskmoe_fairseq.safe_loading import safe_torch_load  # noqa: E402
from taskmoe_fairseq.errors import TaskMoeError, run_cli  # noqa: E402
from taskmoe_fairseq.extract import known_pairs, model_args  # noqa: E402
from taskmoe_fairseq.files import atomic_write_text  # noqa: E402
from taskmoe_fairseq.modules import routing_kinds  # noqa: E402

PREFIX, SUFFIX = "encoder.moe_router.gates.", ".task_logits"


def task_names(key: str, pairs, langs):
    """The tasks the run trains, as (task id, label): target/source languages or the pairs."""
    labels = {}
    for pair in pairs:
        src, tgt = pair.split("-")
        label = {"source": src, "target": tgt, "pair": pair}[key]
        labels[routing_kinds.pair_task_ids(key, pair, langs)] = label
    return sorted(labels.items())


def read_checkpoint(path: str) -> dict:
    """One checkpoint's task-routed layers: layer -> task label -> probs, experts, top-1 prob."""
    state = safe_torch_load(path)
    args = model_args(state, path)  # extract's reading of the config (one line for a non-TaskMoE file)
    langs, pairs, top_k = list(args.langs), known_pairs(args), int(args.moe_top_k)
    updates = state["optimizer_history"][-1].get("num_updates")
    layers = {}
    for name, logits in state["model"].items():
        if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
            continue
        layer = name[len(PREFIX):-len(SUFFIX)]  # e.g. decoder_1
        routing = getattr(args, f"{layer.split('_')[0]}_moe_routing")
        key = routing_kinds.task_key(routing)
        probs = logits.float().softmax(dim=-1)
        tasks = {}
        for task, label in task_names(key, pairs, langs):
            weights, experts = probs[task].topk(top_k)
            tasks[label] = {
                "experts": sorted(int(e) for e in experts),
                "top1_expert": int(experts[0]),
                "top1_prob": float(weights[0]),
                "topk_mass": float(weights.sum()),
                "probs": [round(float(p), 6) for p in probs[task]],
            }
        layers[layer] = {"routing": routing, "task_key": key, "tasks": tasks}
    if not layers:
        raise TaskMoeError(f"{path} has no task-routed MoE layer (token, sentence and static routings have no task gate)")
    return {"checkpoint": os.path.abspath(path), "updates": updates, "top_k": top_k, "layers": layers}


def changes(series):
    """Per layer, between consecutive checkpoints: tasks whose expert set / top-1 expert changed."""
    out = {}
    for layer in series[0]["layers"]:
        steps = []
        for before, after in zip(series, series[1:]):
            a, b = before["layers"][layer]["tasks"], after["layers"][layer]["tasks"]
            steps.append({
                "from": before["updates"], "to": after["updates"],
                "set_changed": sorted(t for t in a if a[t]["experts"] != b[t]["experts"]),
                "top1_changed": sorted(t for t in a if a[t]["top1_expert"] != b[t]["top1_expert"]),
            })
        out[layer] = steps
    return out


def overlap(point):
    """Per layer at one checkpoint: experts shared by every two tasks, and experts in use."""
    out = {}
    for layer, entry in point["layers"].items():
        tasks = entry["tasks"]
        shared = {f"{a}/{b}": len(set(tasks[a]["experts"]) & set(tasks[b]["experts"]))
                  for a, b in itertools.combinations(sorted(tasks), 2)}
        used = sorted({e for t in tasks.values() for e in t["experts"]})
        out[layer] = {"shared": shared, "experts_in_use": used,
                      "mean_shared": sum(shared.values()) / max(1, len(shared))}
    return out


def measure(paths, name):
    series = sorted((read_checkpoint(p) for p in paths), key=lambda point: point["updates"])
    return {
        "kind": "gate_diagnostics",
        "name": name,
        "command": shlex.join(["python", "examples/measure_gates.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "series": series,
        "changes": changes(series),
        "overlap_at_last": overlap(series[-1]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of one run (any order: sorted by updates)")
    parser.add_argument("--out", required=True, help="the JSON record to write")
    parser.add_argument("--name", default="run", help="what the run was (a heading of the report)")
    options = parser.parse_args(argv)
    for path in options.checkpoints:
        if not os.path.isfile(path):
            raise TaskMoeError(f"no checkpoint at {path}: pass the checkpoint files of one run")
    record = measure(options.checkpoints, options.name)
    atomic_write_text(options.out, json.dumps(record, indent=1))
    print(f"wrote {options.out}: {len(record['series'])} checkpoints, layers {', '.join(record['series'][0]['layers'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("measure_gates", main))
