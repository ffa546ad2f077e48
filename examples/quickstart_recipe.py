#!/usr/bin/env python3
"""Measure one candidate quickstart recipe: train it for a fixed number of updates with the
quickstart's data and task, translate the quickstart's test sets (beam 4 with the quickstart's
``--lenpen``, the full model; ``--split valid``: the valid sets, where decoding options are chosen) and
write ``<workdir>/<name>.json`` (``<name>-at-<N>`` with ``--evaluate-at N``, then ``-valid`` and
``-<tag>`` where given; an existing record is never overwritten): command, updates, training
seconds and s/update (NaN for a finished run decoded again; a run resumed from its
``checkpoint_last.pt`` counts only the updates it made, ``resumed_from``), BLEU and chrF per
direction and averaged, sacrebleu signatures. The table in docs/quickstart/recipe.md comes
from these records (``--report``).

The candidate is the recipe of docs/quickstart/results.md (``quickstart.RESULTS_MD_RECIPE``, the
baseline every row is compared against) with fairseq-train options replaced or added after
``--``; a flag option given as ``--no-<flag>`` is removed. Quality at a
fixed number of updates does not depend on machine load; time does, so compare s/update only
between runs made side by side (``--ratio-against``: the same short number of updates of each,
interleaved).

Usage::

    python examples/quickstart_recipe.py --data runs/quickstart/bin --name prenorm --updates 1500 -- \\
        --encoder-normalize-before --decoder-normalize-before --dropout 0
    python examples/quickstart_recipe.py --report runs/recipe/*.json
"""

import argparse
import glob
import json
import os
import re
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "examples")]
import quickstart  # noqa: E402
import scoring  # noqa: E402
from data.script_support import atomic_write_text  # noqa: E402


def split_options(args):
    """fairseq-train options as ``[["--name", value, ...], ...]``, in order."""
    options, current = [], None
    for arg in args:
        if arg.startswith("--"):
            current = [arg]
            options.append(current)
        else:
            current.append(arg)
    return options


def apply_overrides(base, overrides):
    """``base`` fairseq-train options with ``overrides`` applied: an option present in both takes
    the override's values; ``--no-X`` removes flag ``--X``; new options are appended."""
    result = split_options(base)
    for option in split_options(overrides):
        name = option[0]
        if name.startswith("--no-") and any(o[0] == "--" + name[5:] for o in result):
            result = [o for o in result if o[0] != "--" + name[5:]]
            continue
        for index, existing in enumerate(result):
            if existing[0] == name:
                result[index] = option
                break
        else:
            result.append(option)
    return [arg for option in result for arg in option]


def children_cpu_seconds():
    """User + system CPU seconds of the finished child processes (fairseq-train's CPU time depends
    far less on other processes' load than its wall time does)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def translate_in_process(data, checkpoint, beam=4, batch_size=64, lines_per_pair=None, lenpen=1.0, split="test"):
    """``{pair: hypotheses}`` for every test set (or every set of ``split``), decoded in this one process through fairseq's
    hub interface (taskmoe_fairseq.translate's loader) with fairseq-generate's options of the
    quickstart (beam 4, ``max_len_a`` 1.2, ``max_len_b`` 10, ``lenpen``: fairseq's length penalty,
    default 1.0 as fairseq's; the quickstart decodes with ``quickstart.LENPEN``): the same search without 12 start-ups
    of fairseq-generate, which on a loaded machine cost more than the decoding. ``lines_per_pair``:
    only the first N sentences of every test set; ``split``: ``valid`` translates the valid sets
    instead (where decoding options are chosen)."""
    import torch

    from taskmoe_fairseq.translate import load_fairseq

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = {}
    for pair in quickstart.PAIRS:
        lines = quickstart.raw_lines(data, pair, pair.split("-")[0], split)[:lines_per_pair]
        hub = load_fairseq(checkpoint, pair, data_dir=data).hub
        encoded = [hub.encode(line) for line in lines]
        order = sorted(range(len(lines)), key=lambda i: -len(encoded[i]))
        out = [""] * len(lines)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            hypotheses = hub.generate([encoded[i] for i in batch], beam=beam, max_len_a=1.2, max_len_b=10, lenpen=lenpen)
            for i, hypos in zip(batch, hypotheses):
                out[i] = hub.bpe.sp.decode(hub.string(hypos[0]["tokens"]).split()).strip()
        result[pair] = out
        print(f"    decoded {pair} ({len(result)}/{len(quickstart.PAIRS)})", flush=True)
    return result


def updates_done(save_dir):
    """The updates of ``save_dir/checkpoint_last.pt`` (0 without one): where fairseq-train resumes."""
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.isfile(checkpoint):
        return 0
    from taskmoe_fairseq.safe_loading import safe_torch_load

    return int(safe_torch_load(checkpoint)["optimizer_history"][-1]["num_updates"])


def data_summary(data):
    """What the candidate trained on: the binarization's command, vocabulary and line counts
    (``binarize.json``) and, where the raw text came from a make_bundled.py slice, its options."""
    summary = {"path": data}
    info_path = os.path.join(data, "binarize.json")
    if os.path.isfile(info_path):
        info = json.load(open(info_path))
        summary.update(command=info.get("command"), vocab_size=info.get("settings", {}).get("vocab_size"),
                       lines=info.get("lines"))
        manifest = os.path.join(os.path.dirname(info.get("settings", {}).get("raw", "")), "manifest.json")
        if os.path.isfile(manifest):
            summary["slice_options"] = json.load(open(manifest)).get("options")
    return summary


def measure(options, overrides):
    save_dir = os.path.join(options.workdir, options.name)
    recipe = apply_overrides(quickstart.RESULTS_MD_RECIPE, overrides)
    if options.evaluate_at:
        # a checkpoint a running or finished training saved along the way (--save-every)
        updates = options.evaluate_at
        found = glob.glob(os.path.join(save_dir, f"checkpoint_*_{updates}.pt"))
        if not found:
            sys.exit(f"quickstart_recipe: no checkpoint_*_{updates}.pt in {save_dir}")
        checkpoint, train_seconds, train_cpu = found[0], float("nan"), float("nan")
        name = f"{options.name}@{updates}"
    else:
        updates, name = options.updates, options.name
    if options.split != "test":
        name += "-" + options.split
    if options.tag:
        name += "-" + options.tag
    record_path = os.path.join(options.workdir, name.replace("@", "-at-") + ".json")
    if os.path.exists(record_path):
        sys.exit(f"quickstart_recipe: {record_path} exists; pass --tag to keep both records, or delete it")
    resumed_from = 0
    if not options.evaluate_at:
        reused = os.path.exists(os.path.join(save_dir, "done"))  # a finished run decoded again: no training time
        resumed_from = 0 if reused else updates_done(save_dir)
        started, cpu_before = time.time(), children_cpu_seconds()
        checkpoint = quickstart.train(options.data, save_dir, recipe, updates, options.seed, save_every=options.save_every)
        train_seconds, train_cpu = time.time() - started, children_cpu_seconds() - cpu_before
        if reused:
            train_seconds = train_cpu = float("nan")
    trained = max(1, updates - resumed_from)
    rows = {}
    translations = (translate_in_process(options.data, checkpoint, lenpen=options.lenpen, split=options.split)
                    if options.in_process else None)
    for pair in quickstart.PAIRS:
        if translations:
            hyps = translations[pair]
        else:
            hyps, _ = quickstart.generate(options.data, checkpoint, pair, os.path.join(save_dir, "gen", str(updates), pair),
                                          lenpen=options.lenpen)
        refs = quickstart.test_references(options.data, pair, options.split)
        rows[pair] = scoring.score(hyps, refs, pair.split("-")[1])
        # hypothesis / reference length in characters (beam search's length bias; see --lenpen)
        rows[pair]["length_ratio"] = sum(map(len, hyps)) / max(1, sum(map(len, refs)))
        rows[pair].update(scoring.degeneracy(hyps))
        print(f"    {name} {pair}: BLEU {rows[pair]['bleu']:.1f} chrF {rows[pair]['chrf']:.1f}", flush=True)
    record = {
        "name": name, "updates": updates, "checkpoint": checkpoint, "data": data_summary(options.data), "overrides": overrides, "recipe": recipe,
        "resumed_from": resumed_from, "train_seconds": train_seconds, "seconds_per_update": train_seconds / trained,
        "train_cpu_seconds": train_cpu, "cpu_seconds_per_update": train_cpu / trained,
        "threads": os.environ.get("OMP_NUM_THREADS"), "evaluator": "in-process hub" if options.in_process else "fairseq-generate", "lenpen": options.lenpen, "split": options.split, "load_average": os.getloadavg(),
        "chrf_avg": sum(r["chrf"] for r in rows.values()) / len(rows),
        "bleu_avg": sum(r["bleu"] for r in rows.values()) / len(rows),
        "signatures": scoring.signatures(p.split("-")[1] for p in quickstart.PAIRS),
        "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    atomic_write_text(record_path, json.dumps(record, indent=1))
    print(f"{name}: chrF avg {record['chrf_avg']:.1f}, BLEU avg {record['bleu_avg']:.1f}, "
          f"{record['seconds_per_update']:.3f} s/update, {record['cpu_seconds_per_update']:.3f} CPU s/update (this run, this load)")


def max_tokens(recipe):
    """A recipe's --max-tokens (the batch's ceiling in tokens: updates x max-tokens compares
    recipes of different batch sizes at equal training data)."""
    (value,) = [option[1] for option in split_options(recipe) if option[0] == "--max-tokens"][-1:]
    return int(value)


def report(paths):
    print("| run | training pairs per language | options changed | updates | updates x max-tokens (M) | chrF avg | BLEU avg | s/update (this run, its load) | lenpen |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        r = json.load(open(path))
        per_update = r["seconds_per_update"]  # NaN for --evaluate-at and re-decoded records (no training here)
        # records written before the "data" field all trained on the bundled slice (4,000 pairs, <= 100 characters)
        lines = r.get("data", {}).get("lines") or {"en-xx": {"train": 4000}}
        chars = re.search(r"--max-chars (\d+)", r.get("data", {}).get("slice_options") or "--max-chars 100")
        pairs = f"{min(counts['train'] for counts in lines.values()):,} (<= {chars.group(1)} characters)"
        print(f"| {r['name']} | {pairs} | `{' '.join(r['overrides']) or '(results.md recipe)'}` | {r['updates']} | "
              f"{r['updates'] * max_tokens(r['recipe']) / 1e6:.1f} | "
              f"{r['chrf_avg']:.1f} | {r['bleu_avg']:.2f} | {'—' if per_update != per_update else f'{per_update:.3f}'} | "
              f"{r.get('lenpen', 1.0)} |")  # records from before the field were decoded at fairseq's default


def main():
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the quickstart's binarized data (runs/quickstart/bin)")
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "recipe"))
    parser.add_argument("--name")
    parser.add_argument("--updates", type=int, default=quickstart.UPDATES)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save-every", type=int, help="keep a checkpoint every N updates")
    parser.add_argument("--evaluate-at", type=int, metavar="UPDATES",
                        help="only evaluate the checkpoint saved at UPDATES (by a --save-every run)")
    parser.add_argument("--in-process", action="store_true",
                        help="decode all test sets in this process (hub interface) instead of 12 fairseq-generate runs")
    parser.add_argument("--tag", help="appended to the record's name (e.g. one checkpoint decoded with several --lenpen)")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="the sets to translate and score (valid: where --lenpen is chosen; needs --in-process)")
    parser.add_argument("--lenpen", type=float, default=quickstart.LENPEN,
                        help=f"beam search's length penalty (default {quickstart.LENPEN}, the quickstart's; records "
                        "made before this option were decoded at 1.0)")
    parser.add_argument("--report", nargs="*", help="print the table of these JSON records")
    options = parser.parse_args(argv)
    if options.report is not None:
        return report(options.report)
    if not options.data or not options.name:
        sys.exit("quickstart_recipe: --data and --name are required (or --report FILES)")
    if options.split != "test" and not options.in_process:
        sys.exit(f"quickstart_recipe: --split {options.split} needs --in-process (fairseq-generate decodes the test sets)")
    measure(options, overrides)


if __name__ == "__main__":
    main()
