"""Measure adding a language to a trained TaskMoE model (issue 32, part 1; docs/add-language.md).

Three ways to a model that also translates en-it and it-en, from the quickstart's model (six
languages, ``--updates`` more updates each where it is fine-tuned):

* ``add``: ``--moe-add-langs it`` (every old parameter frozen; new gate rows, ``--new-experts`` new
  experts per task-routed layer, the new tag), started from ``--init-from``'s rows and experts;
* ``finetune``: the whole model fine-tuned on the new pairs (``--moe-add-langs it --moe-add-train-all``,
  same start), the usual answer to "how do I add a language";
* ``joint``: the same recipe trained from scratch on all seven languages for the old model's updates
  plus ``--updates``.

Each training runs as its own fairseq-train process (one thread) and records its command, updates,
CPU time (user + sys of the process, the machine being shared) and wall time in
``WORKDIR/<name>/run.json``. ``--evaluate`` then translates (into ``WORKDIR/generate/<run>/<pair>``; a
translation found there is reused) every test set with fairseq-generate
(the quickstart's decoding: beam 4, ``--lenpen 2``, ``--max-len-a 1.2 --max-len-b 10``) with the old
model and the three new ones, scores chrF and BLEU (examples/scoring.py) with paired-bootstrap 95%
intervals of each difference, and writes the JSON record and a markdown table.

Usage::

    python examples/data/binarize.py --raw IT_RAW --out BIN7 --extend-from runs/quickstart/bin --langs it
    python examples/measure_add_language.py --old-checkpoint CKPT --data BIN7 --workdir runs/addlang --train joint
    python examples/measure_add_language.py --old-checkpoint CKPT --data BIN7 --workdir runs/addlang --train add
    python examples/measure_add_language.py --old-checkpoint CKPT --data BIN7 --workdir runs/addlang --train finetune
    python examples/measure_add_language.py --old-checkpoint CKPT --data BIN7 --workdir runs/addlang --evaluate \\
        --out-json docs/add-language/quickstart.json --out-md docs/add-language/quickstart.md

Nothing is written outside ``--workdir`` and the two output files; the checkpoint and data are only read.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "examples"))
import quickstart  # noqa: E402
import scoring  # noqa: E402
from measure_pruning import lscpu, paired_delta  # noqa: E402
from taskmoe_fairseq.files import atomic_write_text  # noqa: E402

PLUGIN = os.path.join(REPO, "taskmoe_fairseq")
NEW = "it"
BEAM, LENPEN, BATCH = 4, 2.0, 64
RUNS = ("add", "finetune", "joint")


def old_model(checkpoint):
    """``(langs, pairs, updates)`` of the old checkpoint."""
    from taskmoe_fairseq.safe_loading import safe_torch_load

    state = safe_torch_load(checkpoint, mmap=True)
    task = state["cfg"]["task"]
    task = task if isinstance(task, dict) else vars(task)
    pairs = task["lang_pairs"]
    pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs)
    langs = task["langs"]
    langs = langs.split(",") if isinstance(langs, str) else list(langs)
    return langs, pairs, int(state["optimizer_history"][-1]["num_updates"])


def task_options(langs, pairs):
    return ["--user-dir", PLUGIN, "--task", "multilingual_translation_taskmoe", "--lang-pairs", ",".join(pairs),
            "--langs", ",".join(langs), "--encoder-langtok", "tgt", "--decoder-langtok"]


def train_command(options, name):
    langs, pairs, updates = old_model(options.old_checkpoint)
    new_pairs = [f"en-{NEW}", f"{NEW}-en"]
    command = ["fairseq-train", options.data, *task_options(langs + [NEW], pairs + new_pairs), *quickstart.RECIPE,
               "--seed", "1", "--cpu", "--save-dir", os.path.join(options.workdir, name), "--no-epoch-checkpoints",
               "--disable-validation", "--log-format", "simple", "--log-interval", "50"]
    if name == "joint":
        return command + ["--max-update", str(updates + options.updates)]
    command += ["--finetune-from-model", options.old_checkpoint, "--max-update", str(options.updates),
                "--warmup-updates", str(options.warmup), "--moe-add-langs", NEW,
                "--moe-new-experts-init-from", options.init_from]
    if name == "add":
        return command + ["--moe-new-experts", str(options.new_experts)]
    return command + ["--moe-add-train-all"]


def train(options, name):
    folder = os.path.join(options.workdir, name)
    os.makedirs(folder, exist_ok=True)
    command = train_command(options, name)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    with open(os.path.join(folder, "train.log"), "w", encoding="utf-8") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"measure_add_language.py: error: {name} training failed; see {folder}/train.log")
    with open(os.path.join(folder, "train.log"), encoding="utf-8") as log:
        text = log.read()
    trained = [line.split("num. trained:")[1].split(")")[0].strip() for line in text.splitlines() if "num. trained:" in line]
    record = {"name": name, "command": " ".join(shlex.quote(part) for part in command), "updates":
              int(command[command.index("--max-update") + 1]),
              "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
              "wall_s": round(time.time() - started, 1), "trained_parameters": trained[0] if trained else None,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))}
    atomic_write_text(os.path.join(folder, "run.json"), json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


def references(data, pair):
    source, target = pair.split("-")
    xx = target if target != "en" else source
    with open(os.path.join(data, "raw", f"test.en-{xx}.{target}"), encoding="utf-8") as stream:
        return stream.read().splitlines()


def generate(options, name, checkpoint, langs, pairs, pair):
    source, target = pair.split("-")
    results = os.path.join(options.workdir, "generate", name, pair)
    expected = len(references(options.data, pair))
    if os.path.isfile(os.path.join(results, "generate-test.txt")):  # translated already (delete it to redo)
        return scoring.read_hypotheses(results, "test", expected)
    command = ["fairseq-generate", options.data, *task_options(langs, pairs), "--source-lang", source,
               "--target-lang", target, "--path", checkpoint, "--gen-subset", "test", "--beam", str(BEAM),
               "--lenpen", str(LENPEN), "--max-len-a", "1.2", "--max-len-b", "10", "--batch-size", str(BATCH),
               "--required-batch-size-multiple", "1", "--cpu", "--num-workers", "0",
               *scoring.generate_args(os.path.join(options.data, "spm.model"), results)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"measure_add_language.py: error: fairseq-generate {name} {pair} failed: "
                 f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return scoring.read_hypotheses(results, "test", len(references(options.data, pair)))


def evaluate(options):
    langs, pairs, updates = old_model(options.old_checkpoint)
    new_pairs = [f"en-{NEW}", f"{NEW}-en"]
    old_pairs_of = options.old_pairs_of.split(",") if options.old_pairs_of else []
    models = {"old": (options.old_checkpoint, langs, pairs, pairs if not options.old_results else [])}
    runs = {}
    for name in RUNS:
        with open(os.path.join(options.workdir, name, "run.json"), encoding="utf-8") as stream:
            runs[name] = json.load(stream)
        checkpoint = os.path.join(options.workdir, name, runs[name].get("checkpoint", "checkpoint_last.pt"))
        models[name] = (checkpoint, langs + [NEW], pairs + new_pairs, (pairs if name in old_pairs_of else []) + new_pairs)
    jobs = [(name, pair) for name, (_, _, _, todo) in models.items() for pair in todo]
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        outputs = list(pool.map(lambda job: generate(options, job[0], *models[job[0]][:3], job[1]), jobs))
    hyps = dict(zip(jobs, outputs))
    if options.old_results:  # the old model's hypotheses from an earlier run with the same decoding
        for pair in pairs:
            hyps[("old", pair)] = scoring.read_hypotheses(options.old_results.format(pair=pair), "test",
                                                          len(references(options.data, pair)))
    import numpy as np

    rng = np.random.default_rng(options.seed)
    rows = []
    for pair in pairs + new_pairs:
        target = pair.split("-")[1]
        refs = references(options.data, pair)
        # sentence indices shared by every system compared on this pair: a paired bootstrap
        resamples = rng.integers(0, len(refs), size=(options.resamples, len(refs)))
        row = {"pair": pair, "sentences": len(refs)}
        base = "old" if pair in pairs else "joint"
        for name in models:
            if (name, pair) not in hyps:
                continue
            scores = scoring.score(hyps[(name, pair)], refs, target)
            entry = {"chrf": round(scores["chrf"], 2), "bleu": round(scores["bleu"], 2)}
            if name != base:
                for metric_name, metric in (("chrf", scoring.chrf_metric()), ("bleu", scoring.bleu_metric(target))):
                    delta, low, high = paired_delta(metric, hyps[(base, pair)], hyps[(name, pair)], refs, resamples)
                    entry[f"{metric_name}_delta_vs_{base}"] = round(delta, 2)
                    entry[f"{metric_name}_delta_vs_{base}_95"] = [round(low, 2), round(high, 2)]
            if name == "add" and pair in pairs and ("old", pair) in hyps:
                entry["hypotheses_identical_to_old"] = hyps[(name, pair)] == hyps[("old", pair)]
            row[name] = entry
        rows.append(row)
    record = {
        "what": "adding Italian to the quickstart's six-language model (docs/add-language.md)",
        "command": " ".join(shlex.quote(part) for part in ["python"] + sys.argv),
        "old_checkpoint": options.old_checkpoint, "old_updates": updates, "data": options.data,
        "old_results": options.old_results,
        "runs": runs,
        "decoding": {"tool": "fairseq-generate", "beam": BEAM, "lenpen": LENPEN, "max_len_a": 1.2, "max_len_b": 10,
                     "batch_size": BATCH, "threads": 1},
        "bootstrap": {"resamples": options.resamples, "seed": options.seed, "interval": 0.95, "base": "old model for old pairs, joint for new"},
        "signatures": scoring.signatures(sorted({p.split("-")[1] for p in pairs + new_pairs})),
        "machine": {"platform": platform.platform(), **lscpu()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(options.out_json)), exist_ok=True)
    atomic_write_text(options.out_json, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(options.out_md, render(record))
    print(render(record))


def render(record):
    runs = record["runs"]
    notes = []
    new_rows = [r for r in record["rows"] if NEW in r["pair"].split("-")]
    old_rows = [r for r in record["rows"] if NEW not in r["pair"].split("-")]

    def cell(entry, key):
        delta = entry.get(f"chrf_delta_vs_{key}")
        if delta is None:
            return f"{entry['chrf']:.1f} / {entry['bleu']:.1f}"
        low, high = entry[f"chrf_delta_vs_{key}_95"]
        return f"{entry['chrf']:.1f} / {entry['bleu']:.1f} ({delta:+.1f} [{low:+.1f}, {high:+.1f}])"

    lines = [
        "# Adding Italian to the quickstart's model: measured",
        "",
        f"Old model: `{record['old_checkpoint']}` ({record['old_updates']} updates, six languages). "
        f"Decoding: fairseq-generate, beam {record['decoding']['beam']}, lenpen {record['decoding']['lenpen']}, one thread. "
        f"Cells: chrF / BLEU, and the chrF difference to the base with its paired-bootstrap 95% interval "
        f"({record['bootstrap']['resamples']} resamples).",
        "",
        "| run | updates | CPU time (user + sys) | wall | trained parameters |",
        "|---|---|---|---|---|",
    ]
    for name in RUNS:
        run = runs[name]
        lines.append(f"| {name} | {run['updates']} | {run['cpu_s'] / 60:.1f} min | {run['wall_s'] / 60:.1f} min | "
                     f"{run.get('trained_parameters') or '?'} |")
        if run.get("note"):
            notes.append(f"{name}: {run['note']}")
    lines += ["", "New pairs (base: joint):", "", "| pair | sentences | add | finetune | joint |", "|---|---|---|---|---|"]
    for row in new_rows:
        lines.append(f"| {row['pair']} | {row['sentences']} | {cell(row['add'], 'joint')} | "
                     f"{cell(row['finetune'], 'joint')} | {cell(row['joint'], 'joint')} |")
    lines += [""] + [f"* {note}" for note in notes] + ([""] if notes else [])
    measured = [name for name in RUNS if name in old_rows[0]]
    lines += ["", "Old pairs (base: the old model; the full models, fairseq-generate):", "",
              "| pair | old | " + " | ".join(measured) + " |", "|---|---|" + "---|" * len(measured)]
    for row in old_rows:
        lines.append(f"| {row['pair']} | {cell(row['old'], 'old')} | " + " | ".join(cell(row[name], 'old') for name in measured) + " |")
    average = {name: sum(r[name]["chrf_delta_vs_old"] for r in old_rows) / len(old_rows) for name in measured}
    lines += ["", "Average chrF change on the old pairs: " + ", ".join(f"{k} {v:+.2f}" for k, v in average.items()) + ".", ""]
    lines += ["Command: `" + record["command"] + "`", ""]
    for name in RUNS:
        lines.append(f"* {name}: `{runs[name]['command']}`")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-checkpoint", required=True, help="the six-language model (the quickstart's checkpoint_last.pt)")
    parser.add_argument("--data", required=True, help="its data extended with en-it (binarize.py --extend-from)")
    parser.add_argument("--workdir", required=True, help="folder for the trainings and translations")
    parser.add_argument("--train", choices=RUNS, help="run one training")
    parser.add_argument("--evaluate", action="store_true", help="translate and score (after the three trainings)")
    parser.add_argument("--updates", type=int, default=300, help="updates of add and finetune; joint: the old model's + these")
    parser.add_argument("--warmup", type=int, default=50, help="--warmup-updates of add and finetune")
    parser.add_argument("--new-experts", type=int, default=2, help="--moe-new-experts of add")
    parser.add_argument("--init-from", default="es", help="--moe-new-experts-init-from of add and finetune")
    parser.add_argument("--jobs", type=int, default=2, help="fairseq-generate runs at a time (one thread each)")
    parser.add_argument("--old-pairs-of", default="finetune",
                        help="comma-separated runs whose old-pair translations are measured too (default finetune: what "
                             "whole-model fine-tuning does to them; add's old pairs are its frozen sub-networks)")
    parser.add_argument("--old-results", metavar="TEMPLATE",
                        help="the old model's fairseq-generate results folder per pair, e.g. work/generate/{pair}/full, from "
                             "a run with this decoding (measure_pruning.py's), instead of translating again")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1, help="bootstrap seed")
    parser.add_argument("--out-json", default="docs/add-language/quickstart.json")
    parser.add_argument("--out-md", default="docs/add-language/quickstart.md")
    options = parser.parse_args(argv)
    if not options.train and not options.evaluate:
        parser.error("give --train add|finetune|joint or --evaluate")
    options.old_checkpoint, options.data, options.workdir = (os.path.abspath(p) for p in (
        options.old_checkpoint, options.data, options.workdir))
    return options


def main(argv=None):
    options = parse_args(argv)
    if options.train:
        train(options, options.train)
    if options.evaluate:
        evaluate(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
