#!/usr/bin/env python3
"""The routing comparison as learning curves (issue #12): every configuration trained with the
quickstart's recipe (``quickstart.RECIPE``: pre-norm, peak lr 5e-3, 4,096-token batches) on the
built corpus at equal updates, each checkpoint along training decoded and scored, so a reader can
see whether the ordering of the routings is still moving.

Measuring only: this writes ``<out>/learning_curves.json`` (per configuration and point: BLEU and
chrF per direction, the averages with 95% paired-bootstrap intervals and their difference from
``dense``); ``examples/report_learning_curves.py`` turns it into the table and the plot, and
``examples/measure_gates.py`` reads the same checkpoints for the task-gate diagnostics.

* Configurations: ``paper_table1.CONFIGS`` (``dense`` is E = k = 2 with static routing, a dense
  FFN of 2 x the width: the top-2 models' active parameters per token). Only the routing (and for
  ``dense`` the expert count) differs from the quickstart's recipe. :data:`REMEDIES` add task-gate
  remedies to compare with their plain configuration (``token/target+static-init``: the task
  gate warm-started from the static assignment, ``--moe-task-gate-init static``).
* Training: ``quickstart.train`` (fairseq-train, seeded, exactly ``--updates`` updates), a
  checkpoint every ``updates / points`` updates. ``--jobs`` configurations train at once, one
  thread each (default: all; on the 2-core machine, 2026-12-02, six at once made 1.1 updates/s
  in all and three at once 1.14, so nothing is lost, and every configuration has the same
  number of updates whenever the run is stopped); an interrupted run resumes from its last
  checkpoint.
* Decoding: the first ``--test-lines`` sentences of every test set (multi-way: sentence i is the
  same English in all 12 directions), in one process per checkpoint through fairseq's hub
  interface (``quickstart_recipe.translate_in_process``), greedy by default.
* Intervals (Koehn 2004, sacrebleu's ``--paired-bs`` statistics): 1,000 resamples of the sentence
  indices, shared by every direction, configuration and point.

Usage::

    python examples/data/build_corpus.py --out /tmp/corpus
    python examples/learning_curves.py --data /tmp/corpus/bin --updates 1200 --points 4 --out docs/learning_curves
    python examples/report_learning_curves.py docs/learning_curves/learning_curves.json
"""

import argparse
import glob
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "examples")]
import quickstart  # noqa: E402
import scoring  # noqa: E402
from data.script_support import atomic_write_bytes  # noqa: E402
from paper_table1 import CONFIGS, hardware, interval, slug  # noqa: E402
from quickstart_recipe import apply_overrides, data_summary, translate_in_process  # noqa: E402

DEFAULT_CONFIGS = ("dense", "token/token", "token/target", "target/target", "token/pair", "static")
# task-gate remedies, each against its plain configuration under the same budget (issue #12)
REMEDIES = {
    "token/target+static-init": ("token", "target", ["--moe-task-gate-init", "static"]),  # warm start from static
    # sparse upcycling: a dense model (no MoE layers) for the first point's updates, then the MoE
    # model from it for the rest of the budget (train_upcycled)
    "token/target+upcycle": ("token", "target", ["--moe-upcycle"]),
}
NO_MOE = ["--encoder-moe-freq", "0", "--decoder-moe-freq", "0"]
CURVE_CONFIGS = {**CONFIGS, **REMEDIES}
SAMPLES = 1000


def recipe(name):
    """The quickstart's fairseq-train options with ``name``'s routing (and expert count)."""
    encoder, decoder, extra = CURVE_CONFIGS[name]
    return apply_overrides(quickstart.RECIPE, ["--encoder-moe-routing", encoder, "--decoder-moe-routing", decoder, *extra])


def checkpoints(save_dir, offset=0):
    """``{updates: path}`` of the run's ``checkpoint_1_<updates>.pt`` files (``offset``: updates
    before the run's own, as for an upcycled run's dense stage)."""
    found = {}
    for path in glob.glob(os.path.join(save_dir, "checkpoint_*_*.pt")):
        match = re.search(r"checkpoint_\d+_(\d+)\.pt$", path)
        if match:
            found[offset + int(match.group(1))] = path
    return dict(sorted(found.items()))


def updates_per_point(options):
    """The updates between two checkpoints along the budget (the first point's updates)."""
    return options.updates // options.points


def is_upcycled(name):
    return "--moe-upcycle" in CURVE_CONFIGS[name][2]


def dense_stage(save_dir):
    return save_dir + "-dense"


def run_checkpoints(save_dir, name, options):
    """``{updates: path}`` along a configuration's budget; an upcycled run's first point is its dense
    stage's checkpoint, the others its MoE stage's, counted after the dense updates."""
    if not is_upcycled(name):
        return checkpoints(save_dir)
    return {**checkpoints(dense_stage(save_dir)), **checkpoints(save_dir, offset=updates_per_point(options))}


def train_upcycled(options, name, save_dir, env):
    """Sparse upcycling under the same budget: the quickstart's recipe without MoE layers (a
    fairseq transformer) for the first point's ``updates / points`` updates, then ``name``'s MoE
    model from its checkpoint (``--finetune-from-model ... --moe-upcycle``: every expert a copy of
    its layer's dense FFN) for the rest. fairseq's fine-tuning starts the MoE stage's optimizer and
    learning-rate schedule (its warm-up included) anew."""
    every = updates_per_point(options)
    dense = quickstart.train(options.data, dense_stage(save_dir), apply_overrides(quickstart.RECIPE, NO_MOE), every,
                             env=env, prefix=f"[{name}, dense stage] ", save_every=every, seed=options.seed)
    quickstart.train(options.data, save_dir, recipe(name) + ["--finetune-from-model", dense], options.updates - every,
                     env=env, prefix=f"[{name}] ", save_every=every, seed=options.seed)


def fairseq_train_seconds(log_path):
    """fairseq-train's own ``done training in S seconds`` from a run's log (None without one), so
    a measurement that reuses finished trainings still reports how long they took."""
    if not os.path.exists(log_path):
        return None
    with open(log_path, encoding="utf-8", errors="replace") as log:
        match = re.search(r"done training in ([\d.]+) seconds", log.read())
    return float(match.group(1)) if match else None


def references(data, lines):
    return {pair: quickstart.test_references(data, pair)[:lines] for pair in quickstart.PAIRS}


def evaluate_point(options, name, updates, path):
    """Hypotheses and scores of one checkpoint, cached in ``<save_dir>/points/<updates>.json``."""
    cache = os.path.join(os.path.dirname(path), "points", f"{updates}.json")
    if os.path.exists(cache):
        return json.load(open(cache))
    started = time.time()
    hypotheses = translate_in_process(options.data, path, beam=options.beam, lines_per_pair=options.test_lines)
    refs = references(options.data, options.test_lines)
    scores = {pair: scoring.score(hypotheses[pair], refs[pair], pair.split("-")[1]) for pair in quickstart.PAIRS}
    point = {"updates": updates, "checkpoint": path, "decode_seconds": time.time() - started,
             "hypotheses": hypotheses, "scores": scores}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_write_bytes(cache, json.dumps(point, ensure_ascii=False).encode("utf-8"))
    print(f"  [{name}] @{updates}: chrF avg {mean(s['chrf'] for s in scores.values()):.1f}, "
          f"BLEU avg {mean(s['bleu'] for s in scores.values()):.2f}", flush=True)
    return point


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def sentence_statistics(hypotheses, refs):
    """Per direction, sacrebleu's per-sentence sufficient statistics for BLEU and chrF
    (``[sentences, stats]`` arrays, :func:`scoring.sentence_statistics`), from which any resample's
    corpus score is recomputed."""
    stats = {}
    for pair in quickstart.PAIRS:
        target = pair.split("-")[1]
        stats[pair] = {
            metric: scoring.sentence_statistics(scorer, hypotheses[pair], refs[pair])
            for metric, scorer in (("bleu", scoring.bleu_metric(target)), ("chrf", scoring.chrf_metric()))
        }
    return stats


def resampled_averages(stats, resamples):
    """``{metric: [samples]}``: the 12-direction average of corpus BLEU / chrF on each resample."""
    import numpy as np

    result = {}
    for metric in ("bleu", "chrf"):
        per_direction = []
        for pair in quickstart.PAIRS:
            scorer = scoring.bleu_metric(pair.split("-")[1]) if metric == "bleu" else scoring.chrf_metric()
            per_direction.append(scoring.resampled_scores(scorer, stats[pair][metric], resamples))
        result[metric] = np.mean(per_direction, axis=0)
    return result


def summarise(options, points_of, samples=SAMPLES):
    """Averages, intervals and differences from dense at every point all configurations reached
    (``samples`` bootstrap resamples)."""
    import numpy as np

    refs = references(options.data, options.test_lines)
    resamples = np.random.default_rng(1).integers(0, options.test_lines, size=(samples, options.test_lines))
    common = sorted(set.intersection(*(set(points) for points in points_of.values())))
    baseline = "dense" if "dense" in points_of else next(iter(points_of))
    summary, remedies = {}, {}
    for updates in common:
        draws = {name: resampled_averages(sentence_statistics(points[updates]["hypotheses"], refs), resamples)
                 for name, points in points_of.items()}
        for name, points in points_of.items():
            scores = points[updates]["scores"]
            row = {}
            for metric in ("bleu", "chrf"):
                row[f"{metric}_avg"] = mean(s[metric] for s in scores.values())
                row[f"{metric}_xx_en"] = mean(scores[f"{xx}-en"][metric] for xx in quickstart.XX)
                row[f"{metric}_en_xx"] = mean(scores[f"en-{xx}"][metric] for xx in quickstart.XX)
                row[f"{metric}_avg_ci95"] = list(interval(draws[name][metric]))
            row["per_direction"] = {pair: {"bleu": s["bleu"], "chrf": s["chrf"]} for pair, s in scores.items()}
            summary.setdefault(name, {})[str(updates)] = row

        def compare(name, other, row, suffix):
            """``row[<metric>_minus_<suffix>]`` and its interval: ``name`` minus ``other``, same resamples."""
            for metric in ("bleu", "chrf"):
                row[f"{metric}_minus_{suffix}"] = (summary[name][str(updates)][f"{metric}_avg"]
                                                   - summary[other][str(updates)][f"{metric}_avg"])
                row[f"{metric}_minus_{suffix}_ci95"] = list(interval(draws[name][metric] - draws[other][metric]))

        for name in points_of:
            if name != baseline:
                compare(name, baseline, summary[name][str(updates)], baseline)
            plain = name.split("+")[0]
            if name in REMEDIES and plain in points_of:  # the remedy against its plain gate
                entry = remedies.setdefault(name, {"against": plain, "points": {}})
                compare(name, plain, entry["points"].setdefault(str(updates), {}), "plain")
    return {"baseline": baseline, "points": common, "configs": summary, "remedies": remedies}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="binarized corpus from examples/data/build_corpus.py (its bin/)")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "learning_curves"))
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "learning_curves"))
    parser.add_argument("--updates", type=int, default=1200, help="updates per configuration (equal budget)")
    parser.add_argument("--points", type=int, default=4, help="checkpoints along training, evenly spaced")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {','.join(CURVE_CONFIGS)}")
    parser.add_argument("--jobs", type=int, default=0, help="configurations trained at once, one thread each (0: all)")
    parser.add_argument("--test-lines", type=int, default=200, help="first N sentences of every test set")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1, help="fairseq-train's --seed for every configuration")
    parser.add_argument("--no-train", action="store_true", help="only decode and score the checkpoints already there")
    options = parser.parse_args(argv)
    names = options.configs.split(",")
    unknown = [name for name in names if name not in CURVE_CONFIGS]
    if unknown:
        sys.exit(f"learning_curves: unknown configuration {','.join(unknown)}; choose from {','.join(CURVE_CONFIGS)}")
    if not os.path.exists(os.path.join(options.data, "spm.model")):
        sys.exit(f"learning_curves: {options.data} has no spm.model; build it with examples/data/build_corpus.py")
    if options.updates % options.points:
        sys.exit(f"learning_curves: --updates {options.updates} is not a multiple of --points {options.points}")
    shortest = min(len(quickstart.test_references(options.data, pair)) for pair in quickstart.PAIRS)
    if options.test_lines > shortest:
        sys.exit(f"learning_curves: --test-lines {options.test_lines} is more than the {shortest} test sentences there are")
    os.makedirs(options.workdir, exist_ok=True)
    started = time.time()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def train(name):
        if is_upcycled(name):
            return train_upcycled(options, name, os.path.join(options.workdir, slug(name)), env)
        quickstart.train(options.data, os.path.join(options.workdir, slug(name)), recipe(name), options.updates, env=env,
                         prefix=f"[{name}] ", save_every=updates_per_point(options), seed=options.seed)

    if not options.no_train:
        with ThreadPoolExecutor(max_workers=options.jobs or len(names)) as pool:  # the work is in fairseq-train
            list(pool.map(train, names))
    train_seconds = {name: fairseq_train_seconds(os.path.join(options.workdir, slug(name)) + ".log") for name in names}
    os.environ.update(env)
    points_of = {}
    for name in names:
        save_dir = os.path.join(options.workdir, slug(name))
        points_of[name] = {updates: evaluate_point(options, name, updates, path)
                           for updates, path in run_checkpoints(save_dir, name, options).items()}
    command = "python examples/learning_curves.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command, "hardware": hardware(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "wall_seconds": time.time() - started, "train_seconds": train_seconds,
        "jobs": options.jobs or len(names), "threads_per_job": 1, "options": vars(options), "data": data_summary(options.data),
        "recipe": {name: recipe(name) for name in names},
        "signatures": scoring.signatures(pair.split("-")[1] for pair in quickstart.PAIRS),
        "decode_seconds": {name: {str(u): p["decode_seconds"] for u, p in points.items()} for name, points in points_of.items()},
        **summarise(options, points_of),
    }
    os.makedirs(options.out, exist_ok=True)
    path = os.path.join(options.out, "learning_curves.json")
    atomic_write_bytes(path, json.dumps(result, indent=1).encode("utf-8"))
    print(f"wrote {path}; the table and plot: python examples/report_learning_curves.py {path}")


if __name__ == "__main__":
    main()
