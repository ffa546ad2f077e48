"""What the DDP backend costs a TaskMoE model: 2 CPU ranks, the same run with each backend, interleaved.

    PYTHONPATH=. python benchmarks/ddp_backend_cost.py --data DATA_BIN --out docs/benchmarks

DATA_BIN: a binarized corpus with en-de, en-fr, en-ru (e.g. the test fixture: the bundled slice
through examples/data/binarize.py). Each round runs ``python -m taskmoe_fairseq.cpu_data_parallel
--nprocs 2 --ddp-backend B`` for every backend B, in turn, and reads words/s and updates/s from
fairseq's end-of-epoch ``train`` line (the whole training loop, without start-up). ``pytorch_ddp``
is torch's DistributedDataParallel with ``find_unused_parameters=True`` (set by the plugin);
``legacy_ddp`` is fairseq's flat-buffer all-reduce of every gradient. A backend written
``B+epP`` (e.g. ``legacy_ddp+ep2``) is B with ``--moe-expert-parallel-size P``: expert parallelism
against data parallelism on the same ranks::

    PYTHONPATH=. python benchmarks/ddp_backend_cost.py --data DATA_BIN --backends legacy_ddp,legacy_ddp+ep2 \
        --name expert_parallel_speed --out docs/benchmarks
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = "en-de,de-en,en-fr,fr-en,en-ru,ru-en"


def train_args(data, save_dir, updates, arch, experts):
    return [
        data, "--user-dir", os.path.join(REPO, "taskmoe_fairseq"),
        "--task", "multilingual_translation_taskmoe", "--lang-pairs", PAIRS, "--langs", "en,de,fr,ru",
        "--encoder-langtok", "tgt", "--decoder-langtok",
        "--arch", arch, "--moe-expert-count", str(experts),
        "--encoder-moe-routing", "token", "--decoder-moe-routing", "target",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "1500", "--max-update", str(updates),
        "--save-dir", save_dir, "--no-save", "--disable-validation", "--seed", "1",
        "--log-format", "simple", "--log-interval", "1000", "--required-batch-size-multiple", "1",
        "--num-workers", "0",
    ]


def run_once(backend, options):
    ddp_backend, _, parallel = backend.partition("+ep")
    with tempfile.TemporaryDirectory() as save_dir:
        command = [sys.executable, "-m", "taskmoe_fairseq.cpu_data_parallel", "--nprocs", "2",
                   "--ddp-backend", ddp_backend, "--",
                   *train_args(options.data, save_dir, options.updates, options.arch, options.experts),
                   *(["--moe-expert-parallel-size", parallel] if parallel else [])]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{backend}: training failed\n{log[-3000:]}")
    summary = [line for line in log.splitlines() if re.search(r"\| train \| epoch", line)][-1]
    value = lambda key: float(re.search(rf"\| {key} ([\d.]+)", summary).group(1))  # noqa: E731
    return {"wps": value("wps"), "ups": value("ups"), "cpu_s": cpu_seconds,
            "find_unused": "find_unused_parameters=True" in log}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default=None, help="folder for ddp_backend_cost.{md,json} (default: print only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--arch", default="taskmoe_transformer_small")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--backends", default="legacy_ddp,pytorch_ddp",
                        help="comma-separated; B+epP adds --moe-expert-parallel-size P")
    parser.add_argument("--name", default="ddp_backend_cost", help="file stem of the .md/.json outputs")
    options = parser.parse_args(argv)
    backends = options.backends.split(",")
    rounds = []
    for round_index in range(options.rounds):
        for backend in backends:
            measured = run_once(backend, options)
            rounds.append({"round": round_index, "backend": backend, **measured})
            print(f"round {round_index} {backend}: {measured['wps']:.0f} words/s, {measured['ups']:.2f} updates/s, "
                  f"{measured['cpu_s']:.1f} CPU s", flush=True)
    medians = {b: {k: statistics.median(r[k] for r in rounds if r["backend"] == b) for k in ("wps", "ups", "cpu_s")} for b in backends}
    lines = [
        "# DDP backend cost, 2 CPU ranks (gloo)", "",
        f"`{' '.join(['python', 'benchmarks/ddp_backend_cost.py', *(argv if argv is not None else sys.argv[1:])])}`", "",
        f"{options.arch}, E = {options.experts}, token/target, {options.updates} updates of 1,500 tokens per rank, "
        f"{options.rounds} interleaved rounds; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"1 thread per rank; torch {torch.__version__}; {datetime.date.today()}", "",
        "words/s and updates/s: fairseq's end-of-epoch train line; CPU s: user + system time of the launcher "
        "and both ranks, start-up included; ratio: words/s against " + backends[0] + " in the same round.", "",
        "| backend | words/s (median) | updates/s (median) | CPU s (median) | words/s vs " + backends[0]
        + " (median of per-round ratios) | rounds (words/s) |",
        "|---|---|---|---|---|---|",
    ]
    for backend in backends:
        mine = [r for r in rounds if r["backend"] == backend]
        base = [r for r in rounds if r["backend"] == backends[0]]
        ratio = statistics.median(m["wps"] / b["wps"] for m, b in zip(mine, base))
        per_round = ", ".join(f"{r['wps']:.0f}" for r in mine)
        lines.append(f"| {backend} | {medians[backend]['wps']:.0f} | {medians[backend]['ups']:.2f} | "
                     f"{medians[backend]['cpu_s']:.1f} | {ratio:.2f}x | {per_round} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if options.out:
        os.makedirs(options.out, exist_ok=True)
        with open(os.path.join(options.out, f"{options.name}.md"), "w") as handle:
            handle.write(report)
        with open(os.path.join(options.out, f"{options.name}.json"), "w") as handle:
            json.dump({"options": vars(options), "rounds": rounds, "medians": medians}, handle, indent=1)


if __name__ == "__main__":
    main()
