"""Measure per-pair pruning of token-routed layers (issue 32, part 2; docs/pruning.md): for each K,
every pair's sub-network with its token-routed layers pruned to K experts
(``python -m taskmoe_fairseq.extract --prune-token-experts K``, chosen on the pair's valid split),
against the full model: parameters, file size, chrF and BLEU per direction with paired-bootstrap
95% intervals of the difference (Koehn 2004; examples/scoring.py), fairseq-generate's tokens/s.

Usage::

    python examples/measure_pruning.py --checkpoint runs/quickstart/checkpoints/checkpoint_last.pt \\
        --data runs/quickstart/bin --workdir runs/pruning --ks 1,2,4,8 \\
        --out-json docs/pruning/quickstart.json --out-md docs/pruning/quickstart.md

Decoding follows the quickstart (fairseq-generate, beam 4, ``--lenpen 2``, ``--max-len-a 1.2
--max-len-b 10``, batch 64, one thread per run); the full model and each pruned one translate the
same test sets (``<data>/test.*``), ``--jobs`` runs at a time. The exact sub-network (``extract`` without pruning) is listed
for its size only: it translates exactly as the full model (tests/test_extract.py). Nothing is
written outside ``--workdir`` and the two output files; the checkpoint and data are only read.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "examples"))
import scoring  # noqa: E402
from taskmoe_fairseq.safe_loading import safe_torch_load  # noqa: E402
from taskmoe_fairseq.extract import known_pairs, model_args  # noqa: E402
from taskmoe_fairseq.files import atomic_write_text  # noqa: E402
from taskmoe_fairseq.models.checkpoint_config import saved_options  # noqa: E402

PLUGIN = os.path.join(REPO, "taskmoe_fairseq")
BEAM, LENPEN, BATCH = 4, 2.0, 64
GOAL_K, GOAL_CHRF = 2, 1.0  # issue 32: at K = 2 of 8 within 1 chrF of the full model on average


def run(command, env=None):
    """Run a command; its combined output, or exit with its last lines."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-15:])
        sys.exit(f"measure_pruning: {shlex.join(command[:4])} ... failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def task_options(task):
    """fairseq-generate's task options, as the checkpoint was trained."""
    options = ["--user-dir", PLUGIN, "--task", "multilingual_translation_taskmoe",
               "--lang-pairs", ",".join(task.lang_pairs if not isinstance(task.lang_pairs, str) else task.lang_pairs.split(",")),
               "--langs", ",".join(task.langs)]
    if getattr(task, "encoder_langtok", None):
        options += ["--encoder-langtok", task.encoder_langtok]
    if getattr(task, "decoder_langtok", False):
        options += ["--decoder-langtok"]
    return options


def raw_test(data, pair, lang):
    """``lang``'s side of ``pair``'s raw test set (``xx-en`` reads the ``en-xx`` files)."""
    source, target = pair.split("-")
    en_xx = "en-" + (target if target != "en" else source)
    with open(os.path.join(data, "raw", f"test.{en_xx}.{lang}"), encoding="utf-8") as stream:
        return stream.read().splitlines()


def generate(data, task, checkpoint, pair, results):
    source, target = pair.split("-")
    log = run(["fairseq-generate", data, *task_options(task), "--source-lang", source, "--target-lang", target,
               "--path", checkpoint, "--gen-subset", "test", "--beam", str(BEAM), "--lenpen", str(LENPEN),
               "--max-len-a", "1.2", "--max-len-b", "10", "--batch-size", str(BATCH),
               "--required-batch-size-multiple", "1", "--cpu", "--num-workers", "0",
               *scoring.generate_args(os.path.join(data, "spm.model"), results)])
    expected = len(raw_test(data, pair, target))
    return scoring.read_hypotheses(results, "test", expected), scoring.generation_speed(log)


def paired_delta(metric, base, system, references, resamples):
    """``(delta, low, high)``: corpus score of ``system`` minus ``base`` and its 95% paired-bootstrap interval."""
    import numpy as np

    stats_base = scoring.sentence_statistics(metric, base, references)
    stats_system = scoring.sentence_statistics(metric, system, references)
    delta = (metric._compute_score_from_stats(stats_system.sum(0)).score
             - metric._compute_score_from_stats(stats_base.sum(0)).score)
    diffs = scoring.resampled_scores(metric, stats_system, resamples) - scoring.resampled_scores(metric, stats_base, resamples)
    return delta, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def lscpu():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key: fields[key].strip() for key in ("Model name", "CPU(s)", "Thread(s) per core", "Flags") if key in fields and key != "Flags"}


def weights_only_bytes(checkpoint, path):
    """Size of the full model's weights and config alone (no optimizer state), as extract writes its outputs."""
    state = safe_torch_load(checkpoint)
    kept = {key: value for key, value in state.items() if key != "last_optimizer_state"}
    torch.save(kept, path)
    return os.path.getsize(path)


def measure(options):
    import numpy as np

    started = time.time()
    checkpoint, data, work = os.path.abspath(options.checkpoint), os.path.abspath(options.data), os.path.abspath(options.workdir)
    os.makedirs(work, exist_ok=True)
    state = safe_torch_load(checkpoint, mmap=True)
    args = model_args(state, checkpoint)
    task = saved_options(state)[1]
    pairs = options.pairs.split(",") if options.pairs else known_pairs(args)
    experts = int(args.moe_expert_count)
    ks = [int(k) for k in options.ks.split(",")]
    updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates")
    state = None

    extract = [sys.executable, "-m", "taskmoe_fairseq.extract", "--checkpoint", checkpoint, "--lang-pairs", ",".join(pairs),
               "--data-dir", data, "--force"]
    commands = [extract + ["--output-dir", os.path.join(work, "exact")]] + [
        extract + ["--output-dir", os.path.join(work, f"k{k}"), "--prune-token-experts", str(k),
                   "--pruning-sentences", str(options.pruning_sentences)] for k in ks]
    print(f"extract: exact and K = {options.ks} ({options.jobs} at a time) ...", flush=True)
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        list(pool.map(run, commands))

    # every translation: (pair, "full" or K) -> (hypotheses, tokens/s), options.jobs runs at a time
    # pair by pair, the full model beside the pruned ones: they run under the same load
    jobs = [job for pair in pairs for job in [(pair, "full", checkpoint)] + [
        (pair, str(k), os.path.join(work, f"k{k}", f"{pair}.pt")) for k in ks]]
    print(f"fairseq-generate: {len(jobs)} runs ({options.jobs} at a time) ...", flush=True)

    def translate(job):
        pair, system, path = job
        out = generate(data, task, path, pair, os.path.join(work, "generate", pair, system))
        print(f"    {pair} {system}: {out[1]} tokens/s", flush=True)
        return job[:2], out

    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        outputs = dict(pool.map(translate, jobs))

    rng = np.random.default_rng(options.seed)
    rows = []
    for pair in pairs:
        target = pair.split("-")[1]
        references = raw_test(data, pair, target)
        resamples = rng.integers(0, len(references), size=(options.resamples, len(references)))
        full_hyps, full_speed = outputs[(pair, "full")]
        full_scores = scoring.score(full_hyps, references, target)
        exact_report = json.load(open(os.path.join(work, "exact", f"{pair}.report.json"), encoding="utf-8"))
        row = {
            "pair": pair, "sentences": len(references),
            "full": {"chrf": full_scores["chrf"], "bleu": full_scores["bleu"], "tokens_per_s": full_speed,
                     "params": exact_report["params_before"]},
            "exact": {"params": exact_report["params_after"], "file_bytes": exact_report["file_bytes_after"]},
            "pruned": {},
        }
        for k in ks:
            report = json.load(open(os.path.join(work, f"k{k}", f"{pair}.report.json"), encoding="utf-8"))
            hyps, speed = outputs[(pair, str(k))]
            entry = {"params": report["params_after"], "file_bytes": report["file_bytes_after"], "tokens_per_s": speed,
                     "identical_hypotheses": sum(a == b for a, b in zip(hyps, full_hyps)),
                     "kept": {r["layer"]: {"experts": r["experts_kept"], "token_share": r["kept_share"]}
                              for r in report["layers"] if r.get("routing") == "token"}}
            for name, metric in (("chrf", scoring.chrf_metric()), ("bleu", scoring.bleu_metric(target))):
                delta, low, high = paired_delta(metric, full_hyps, hyps, references, resamples)
                entry[name] = row["full"][name] + delta
                entry[f"{name}_delta"], entry[f"{name}_delta_95"] = delta, [low, high]
            row["pruned"][str(k)] = entry
            low, high = entry["chrf_delta_95"]
            print(f"{pair} K = {k}: chrF {entry['chrf']:.1f} ({entry['chrf_delta']:+.2f} [{low:+.2f}, {high:+.2f}]), "
                  f"params {entry['params']:,}", flush=True)
        rows.append(row)

    full_bytes = weights_only_bytes(checkpoint, os.path.join(work, "full-weights.pt"))
    averages = {str(k): {name: float(np.mean([r["pruned"][str(k)][f"{name}_delta"] for r in rows])) for name in ("chrf", "bleu")}
                for k in ks}
    return {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "hardware": {**lscpu(), "note": "shared 2-core machine (other jobs ran): tokens/s are indicative, not a speed claim"},
        "software": {"python": platform.python_version(), "torch": torch.__version__},
        "checkpoint": checkpoint, "updates": updates, "data": data, "experts": experts, "top_k": int(args.moe_top_k),
        "routing": {"encoder": args.encoder_moe_routing, "decoder": args.decoder_moe_routing},
        "decoding": {"beam": BEAM, "lenpen": LENPEN, "max_len_a": 1.2, "max_len_b": 10, "batch_size": BATCH, "threads": 1,
                     "runs_at_a_time": options.jobs},
        "pruning": {"data": "valid", "metric": "load", "sentences": options.pruning_sentences},
        "bootstrap": {"resamples": options.resamples, "seed": options.seed, "interval": 0.95},
        "full_weights_bytes": full_bytes,
        "ks": ks, "rows": rows, "average_delta": averages,
        "goal": {"k": GOAL_K, "max_chrf_loss": GOAL_CHRF,
                 "met": averages[str(GOAL_K)]["chrf"] >= -GOAL_CHRF if str(GOAL_K) in averages else None},
    }


def markdown(record):
    ks, rows = record["ks"], record["rows"]
    experts = record["experts"]
    first = rows[0]
    lines = [
        f"# Pruning token-routed layers per pair: measured ({record['date_utc']} UTC)", "",
        f"Model: `{record['checkpoint']}` ({record['updates']} updates, "
        f"{record['routing']['encoder']}/{record['routing']['decoder']} routing, "
        f"E = {experts}, top-{record['top_k']}). Experts chosen per pair by `{record['pruning']['metric']}` on its valid split "
        f"(up to {record['pruning']['sentences']} sentences). Decoding: fairseq-generate, beam {record['decoding']['beam']}, "
        f"lenpen {record['decoding']['lenpen']}, one thread. Intervals: paired bootstrap, {record['bootstrap']['resamples']} "
        "resamples, 95%, of the difference to the full model.", "",
        f"Command: `{record['command']}`  ", f"Wall time: {record['wall_seconds'] / 60:.1f} min. "
        f"Hardware: {record['hardware'].get('Model name', '?')}, {record['hardware'].get('CPU(s)', '?')} CPUs "
        f"({record['hardware']['note']}).", "",
        "## Size (one pair's checkpoint)", "",
        "| model | parameters | share | file |", "|---|---:|---:|---:|",
        f"| full | {first['full']['params']:,} | 100% | {record['full_weights_bytes'] / 2**20:.1f} MiB (weights only) |",
        f"| exact sub-network (extract) | {first['exact']['params']:,} | {first['exact']['params'] / first['full']['params']:.0%} "
        f"| {first['exact']['file_bytes'] / 2**20:.1f} MiB |",
    ]
    for k in ks:
        entry = first["pruned"][str(k)]
        lines.append(f"| pruned, K = {k} of {experts} | {entry['params']:,} | {entry['params'] / first['full']['params']:.0%} "
                     f"| {entry['file_bytes'] / 2**20:.1f} MiB |")
    lines += ["", f"(pair {first['pair']}; every pair's sub-network has the same size.)", "",
              "## chrF per direction (difference to the full model, 95% interval)", "",
              "| pair | full | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|---:|" + "---:|" * len(ks)]
    for row in rows:
        cells = [f"{row['pruned'][str(k)]['chrf']:.1f} ({row['pruned'][str(k)]['chrf_delta']:+.1f} "
                 f"[{row['pruned'][str(k)]['chrf_delta_95'][0]:+.1f}, {row['pruned'][str(k)]['chrf_delta_95'][1]:+.1f}])" for k in ks]
        lines.append(f"| {row['pair']} | {row['full']['chrf']:.1f} | " + " | ".join(cells) + " |")
    average_full = sum(r["full"]["chrf"] for r in rows) / len(rows)
    lines.append(f"| **average** | {average_full:.1f} | " + " | ".join(
        f"{average_full + record['average_delta'][str(k)]['chrf']:.1f} ({record['average_delta'][str(k)]['chrf']:+.2f})" for k in ks) + " |")
    lines += ["", "## BLEU per direction", "", "| pair | full | " + " | ".join(f"K = {k}" for k in ks) + " |",
              "|---|---:|" + "---:|" * len(ks)]
    for row in rows:
        cells = [f"{row['pruned'][str(k)]['bleu']:.1f} ({row['pruned'][str(k)]['bleu_delta']:+.1f} "
                 f"[{row['pruned'][str(k)]['bleu_delta_95'][0]:+.1f}, {row['pruned'][str(k)]['bleu_delta_95'][1]:+.1f}])" for k in ks]
        lines.append(f"| {row['pair']} | {row['full']['bleu']:.1f} | " + " | ".join(cells) + " |")
    lines.append("| **average delta** | | " + " | ".join(f"{record['average_delta'][str(k)]['bleu']:+.2f}" for k in ks) + " |")
    lines += ["", "## Kept experts' share of the pair's routing (valid sample), and decoding speed", "",
              "Share: the kept experts' share of the pair's top-k assignments in the encoder's token-routed layers, "
              "on the valid sample. Speed: fairseq-generate's target tokens/s, one thread per run, "
              f"{record['decoding']['runs_at_a_time']} runs at a time on a shared machine (indicative only).", "",
              "| pair | full tok/s | " + " | ".join(f"K = {k}: share, tok/s, same hyps" for k in ks) + " |",
              "|---|---:|" + "---:|" * len(ks)]
    for row in rows:
        cells = []
        for k in ks:
            entry = row["pruned"][str(k)]
            share = min(v["token_share"] for v in entry["kept"].values()) if entry["kept"] else 1.0
            cells.append(f"{share:.0%}, {entry['tokens_per_s'] or 0:.0f}, {entry['identical_hypotheses']}/{row['sentences']}")
        lines.append(f"| {row['pair']} | {row['full']['tokens_per_s'] or 0:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "sacrebleu signatures (SentencePiece-decoded output, one reference):"]
    lines += [f"* {line}" for line in scoring.signature_lines(row["pair"].split("-")[1] for row in rows)]
    goal = record["goal"]
    if str(goal["k"]) in record["average_delta"]:
        lines += ["", f"Goal (issue 32): at K = {goal['k']} of {experts}, within {goal['max_chrf_loss']} chrF of the full model "
                  f"on average: **{'met' if goal['met'] else 'not met'}** "
                  f"({record['average_delta'][str(goal['k'])]['chrf']:+.2f} chrF)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="full token-routed TaskMoE checkpoint (read only)")
    parser.add_argument("--data", help="its binarized data folder with raw/ test sets (read only)")
    parser.add_argument("--workdir", help="where the sub-networks and translations go")
    parser.add_argument("--ks", default="1,2,4,8", help="experts kept per token-routed layer (comma-separated)")
    parser.add_argument("--pairs", help="comma-separated pairs (default: the model's)")
    parser.add_argument("--pruning-sentences", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="commands run at a time, one thread each (default 2)")
    parser.add_argument("--out-json")
    parser.add_argument("--out-md", required=True)
    parser.add_argument("--render", metavar="JSON", help="only write --out-md again from a record this script wrote")
    options = parser.parse_args(argv)
    if not options.out_md or (not options.render and not (options.checkpoint and options.data and options.workdir and options.out_json)):
        parser.error("pass --checkpoint, --data, --workdir, --out-json and --out-md (or --render JSON --out-md)")
    if options.render:
        with open(options.render, encoding="utf-8") as stream:
            record = json.load(stream)
        atomic_write_text(options.out_md, markdown(record))
        return 0
    record = measure(options)
    os.makedirs(os.path.dirname(os.path.abspath(options.out_json)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(options.out_md)), exist_ok=True)
    atomic_write_text(options.out_json, json.dumps(record, indent=2) + "\n")
    atomic_write_text(options.out_md, markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
