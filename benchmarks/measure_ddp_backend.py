"""What the DDP backend costs a TaskMoE model: 2 CPU ranks, the same run with each backend, interleaved.

    PYTHONPATH=. python benchmarks/measure_ddp_backend.py --data DATA_BIN --out docs/benchmarks/ddp_backend_cost.json
    PYTHONPATH=. python benchmarks/report.py docs/benchmarks/ddp_backend_cost.json --out docs/benchmarks

DATA_BIN: a binarized corpus with en-de, en-fr, en-ru (e.g. the test fixture: the bundled slice
through examples/data/binarize.py). Each round runs ``torchrun --standalone --nproc_per_node 2 -m
fairseq_cli.train ... --distributed-backend gloo --ddp-backend B`` for every backend B, in turn, and reads words/s and updates/s from
fairseq's end-of-epoch ``train`` line (the whole training loop, without start-up). ``pytorch_ddp``
is torch's DistributedDataParallel with ``find_unused_parameters=True`` (set by the plugin);
``legacy_ddp`` is fairseq's flat-buffer all-reduce of every gradient. Writes one JSON record
(benchmarks/timing.py: command, hardware, date, versions, every round); ``report.py`` turns it
into ``ddp_backend_cost.md``. A backend written ``B+epP`` (e.g.
``legacy_ddp+ep2``) is B with ``--moe-expert-parallel-size P``: expert parallelism against data
parallelism on the same ranks (``--kind expert_parallel_speed`` names that record and its report)::

    PYTHONPATH=. python benchmarks/measure_ddp_backend.py --data DATA_BIN --backends legacy_ddp,legacy_ddp+ep2 \
        --kind expert_parallel_speed --out docs/benchmarks/expert_parallel_speed.json

"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
import timing  # noqa: E402

PAIRS = "en-de,de-en,en-fr,fr-en,en-ru,ru-en"
TOKENS_PER_RANK = 1500


def train_args(data, save_dir, updates, arch, experts):
    return [
        data, "--user-dir", os.path.join(REPO, "taskmoe_fairseq"),
        "--task", "multilingual_translation_taskmoe", "--lang-pairs", PAIRS, "--langs", "en,de,fr,ru",
        "--encoder-langtok", "tgt", "--decoder-langtok",
        "--arch", arch, "--moe-expert-count", str(experts),
        "--encoder-moe-routing", "token", "--decoder-moe-routing", "target",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "0.001", "--max-tokens", str(TOKENS_PER_RANK), "--max-update", str(updates),
        "--save-dir", save_dir, "--no-save", "--disable-validation", "--seed", "1",
        "--log-format", "simple", "--log-interval", "1000", "--required-batch-size-multiple", "1",
        "--num-workers", "0",
    ]


def run_once(backend, options):
    ddp_backend, _, parallel = backend.partition("+ep")
    with tempfile.TemporaryDirectory() as save_dir:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "fairseq_cli.train",
                   *train_args(options.data, save_dir, options.updates, options.arch, options.experts),
                   "--cpu", "--distributed-backend", "gloo", "--ddp-backend", ddp_backend,
                   *(["--moe-expert-parallel-size", parallel] if parallel else [])]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
        before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        wall_seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{backend}: training failed\n{log[-3000:]}")
    summary = [line for line in log.splitlines() if re.search(r"\| train \| epoch", line)][-1]
    value = lambda key: float(re.search(rf"\| {key} ([\d.]+)", summary).group(1))  # noqa: E731
    return {"wps": value("wps"), "ups": value("ups"), "cpu_s": cpu_seconds, "wall_s": wall_seconds,
            "find_unused": "find_unused_parameters=True" in log}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="binarized corpus with en-de, en-fr, en-ru")
    parser.add_argument("--out", default="docs/benchmarks/ddp_backend_cost.json", help="the JSON record to write")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--arch", default="taskmoe_transformer_small")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--backends", default="legacy_ddp,pytorch_ddp",
                        help="comma-separated, the first is the reference of the ratios; B+epP adds --moe-expert-parallel-size P")
    parser.add_argument("--kind", default="ddp_backend_cost", choices=("ddp_backend_cost", "expert_parallel_speed"),
                        help="the record's kind: report.py writes <kind>.md from it")
    parser.add_argument("--note", action="append", default=[], help="a sentence for the report, e.g. what DATA is (repeatable)")
    options = parser.parse_args(argv)
    backends = options.backends.split(",")
    config = {"data": options.data, "rounds": options.rounds, "updates": options.updates, "arch": options.arch,
              "experts": options.experts, "backends": backends, "tokens_per_rank": TOKENS_PER_RANK, "threads_per_rank": 1,
              "notes": options.note}
    import taskmoe_fairseq  # noqa: F401  (imports fairseq quietly before the record asks its version)

    run = timing.Run(options.kind, __file__, argv, threads=1, config=config)
    rounds = []
    for round_index in range(options.rounds):
        for backend in backends:
            measured = run_once(backend, options)
            rounds.append({"round": round_index, "backend": backend, **measured})
            run.log(f"round {round_index} {backend}: {measured['wps']:.0f} words/s, {measured['ups']:.2f} updates/s, "
                    f"{measured['cpu_s']:.1f} CPU s")
    medians = {b: {k: statistics.median(r[k] for r in rounds if r["backend"] == b) for k in ("wps", "ups", "cpu_s", "wall_s")}
               for b in backends}
    run.record["results"] = {"rounds": rounds, "medians": medians}
    run.write(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
