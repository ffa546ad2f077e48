"""What one server for every pair costs: resident memory and request latency.

    PYTHONPATH=. python benchmarks/measure_serving.py --workdir /tmp/serving-bench --out docs/benchmarks/serving.json
    PYTHONPATH=. python benchmarks/report_serving.py docs/benchmarks/serving.json --out docs/benchmarks

The model: the bundled 6-language slice (12 directions) binarized by ``examples/data/binarize.py``,
and a ``taskmoe_transformer_small`` with 6+6 layers (d 256, FFN 1024, MoE in every other layer),
E = 32 experts, top-2, token/target routing (``--routing``), after ``--updates`` updates of the real
``fairseq-train`` (its weights barely trained: this measures memory and speed, not quality), saved
as a fairseq checkpoint; ``python -m taskmoe_fairseq.extract --all-lang-pairs`` writes the 12
sub-networks. ``--workdir`` keeps data, checkpoints and extractions for reuse.

Memory (``VmRSS`` of each process, read from ``/proc/PID/status`` by this script; one process at
a time, so none pages another out):

* the server on the full checkpoint (``--max-expert-sets 12``) after starting, then after one
  request for each of 1, 6 and 12 pairs;
* each pair's extracted checkpoint served alone by the same command, after one request; the sum
  of the 12 is what 12 separate processes hold;
* the full model in one process (``taskmoe_fairseq.translate.load_translator`` on the full
  checkpoint: fairseq's hub with every expert), after one batch.

Speed: two servers at once, one on the full checkpoint and one on the extracted en-de
checkpoint, both ``--threads 1``; a client in this process sends ``--requests`` sequential
requests per round to each (rounds interleaved, order rotating, as ``timing.interleaved_rounds``
does) at batch 1 (one text per request) and 16, beam ``--beam``, ``max_len_b`` ``--max-len-b``.
Reported: requests/s per round (median over rounds, and the per-round ratio full-server /
extracted), latency p50/p90/p99 over every request of every round. Nothing here asserts on time.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "taskmoe_fairseq")
BUNDLED = os.path.join(REPO, "examples", "data", "bundled", "libreoffice-6pairs.tar.xz")
LANGS = ["en", "de", "fr", "es", "ru", "ja", "zh"]
PAIRS = [f"{a}-{b}" for xx in LANGS[1:] for a, b in (("en", xx), (xx, "en"))]
ORDER = ["en-de", "de-en", "en-fr", "fr-en", "en-es", "es-en", "en-ru", "ru-en", "en-ja", "ja-en", "en-zh", "zh-en"]


def env(threads: int):
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def check_run(command, threads=1):
    result = subprocess.run(command, env=env(threads), capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def prepare(workdir: str, options, log) -> dict:
    """Data, full checkpoint and 12 extracted checkpoints under ``workdir`` (reused if there)."""
    raw = os.path.join(workdir, "libreoffice-6pairs", "raw")
    data = os.path.join(workdir, "bin")
    if not os.path.exists(os.path.join(data, "spm.model")):
        with tarfile.open(BUNDLED) as archive:
            archive.extractall(workdir, filter="data")
        check_run([sys.executable, os.path.join(REPO, "examples", "data", "binarize.py"), "--raw", raw, "--out", data,
                   "--workers", "1"])
        log(f"binarized the bundled slice into {data}")
    name = f"E{options.experts}-{options.routing.replace('/', '-')}"
    save_dir = os.path.join(workdir, name)
    full = os.path.join(save_dir, "checkpoint_last.pt")
    encoder, decoder = options.routing.split("/")
    if not os.path.exists(full):
        check_run(["fairseq-train", data, "--user-dir", PLUGIN, "--task", "multilingual_translation_taskmoe",
                   "--lang-pairs", ",".join(PAIRS), "--langs", ",".join(LANGS), "--encoder-langtok", "tgt", "--decoder-langtok",
                   "--arch", "taskmoe_transformer_small", "--encoder-layers", "6", "--decoder-layers", "6",
                   "--moe-expert-count", str(options.experts), "--encoder-moe-routing", encoder, "--decoder-moe-routing", decoder,
                   "--criterion", "moe_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "0.001",
                   "--max-tokens", "2000", "--max-update", str(options.updates), "--save-dir", save_dir,
                   "--no-epoch-checkpoints", "--no-save-optimizer-state", "--cpu", "--seed", "1", "--num-workers", "0",
                   "--required-batch-size-multiple", "1"], threads=options.threads)
        log(f"trained {options.updates} updates: {full}")
    extracted = os.path.join(save_dir, "extracted")
    if not all(os.path.exists(os.path.join(extracted, f"{pair}.pt")) for pair in PAIRS):
        check_run([sys.executable, "-m", "taskmoe_fairseq.extract", "--checkpoint", full, "--all-lang-pairs",
                   "--output-dir", extracted, "--force"])
        log(f"extracted 12 pairs into {extracted}")
    return {"data": data, "raw": raw, "full": full, "extracted": extracted}


def test_lines(raw: str, pair: str, count: int):
    source, target = pair.split("-")
    xx = target if source == "en" else source
    with open(os.path.join(raw, f"test.en-{xx}.{source}"), encoding="utf-8") as stream:
        return [line.rstrip("\n") for _, line in zip(range(count), stream)]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


class ServerProcess:
    """``python -m taskmoe_fairseq.serve`` in a child process, on a free port."""

    def __init__(self, checkpoint: str, threads: int, max_expert_sets: int = 12):
        command = [sys.executable, "-m", "taskmoe_fairseq.serve", "--checkpoint", checkpoint, "--port", "0",
                   "--threads", str(threads), "--max-expert-sets", str(max_expert_sets), "--max-texts", "64"]
        self.process = subprocess.Popen(command, env=env(threads), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"on (http://\S+)$", line.strip())
        if match is None:
            raise SystemExit(f"server did not start: {line!r}\n{self.process.stderr.read()[-3000:]}")
        self.url = match.group(1)

    def translate(self, pair, texts, beam, max_len_b):
        body = json.dumps({"lang_pair": pair, "texts": texts, "beam": beam, "max_len_b": max_len_b}).encode()
        request = urllib.request.Request(self.url + "/translate", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())["translations"]

    def rss(self) -> float:
        return rss_mib(self.process.pid)

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


def child_full(spec: dict):
    """In a fresh interpreter: the full model through translate.load_translator, one batch; print RSS."""
    import torch

    from taskmoe_fairseq import translate

    torch.set_num_threads(spec["threads"])
    translator = translate.load_translator(spec["checkpoint"], "en-de")
    translate.translate_lines(translator, spec["texts"], beam=spec["beam"], max_len_b=spec["max_len_b"])
    print(json.dumps({"rss_mib": rss_mib(os.getpid()), "peak_rss_mib": rss_mib(os.getpid(), "VmHWM")}))


def measure_memory(run, paths, options) -> dict:
    texts = {pair: test_lines(paths["raw"], pair, 4) for pair in PAIRS}
    out = {}
    server = ServerProcess(paths["full"], options.threads)
    try:
        out["server_started_mib"] = server.rss()
        for count in (1, 6, 12):
            for pair in ORDER[:count]:
                server.translate(pair, texts[pair], options.beam, options.max_len_b)
            out[f"server_{count}_pairs_mib"] = server.rss()
            run.log(f"server, {count} pairs in use: {out[f'server_{count}_pairs_mib']:.0f} MiB")
        health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=60).read())
        out["server_expert_sets_12_pairs"] = len(health["expert_sets"]["loaded"])
        out["server_peak_mib"] = rss_mib(server.process.pid, "VmHWM")
    finally:
        server.stop()
    alone = {}
    for pair in ORDER:
        server = ServerProcess(os.path.join(paths["extracted"], f"{pair}.pt"), options.threads)
        try:
            server.translate(pair, texts[pair], options.beam, options.max_len_b)
            alone[pair] = server.rss()
        finally:
            server.stop()
        run.log(f"extracted {pair} served alone: {alone[pair]:.0f} MiB")
    out["extracted_alone_mib"] = alone
    out["extracted_12_processes_mib"] = sum(alone.values())
    spec = {"checkpoint": paths["full"], "threads": options.threads, "texts": texts["en-de"], "beam": options.beam,
            "max_len_b": options.max_len_b}
    child = check_run([sys.executable, os.path.abspath(__file__), "--child-full", json.dumps(spec)], threads=options.threads)
    out["full_model_process"] = json.loads(child.stdout.strip().splitlines()[-1])
    run.log(f"full model in one process: {out['full_model_process']['rss_mib']:.0f} MiB")
    return out


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[rank]


def measure_speed(run, paths, options) -> dict:
    lines = test_lines(paths["raw"], "en-de", 64)
    servers = {"server_full": ServerProcess(paths["full"], options.threads),
               "extracted_alone": ServerProcess(os.path.join(paths["extracted"], "en-de.pt"), options.threads)}
    results = {}
    try:
        for batch in (1, 16):
            requests = [lines[(i * batch) % len(lines):][:batch] or lines[:batch] for i in range(options.requests)]
            outputs = {}

            def runner(key):
                def one_round():
                    latencies, answers = [], []
                    for texts in requests:
                        start = time.perf_counter()
                        answers.append(servers[key].translate("en-de", texts, options.beam, options.max_len_b))
                        latencies.append(time.perf_counter() - start)
                    outputs[key] = answers
                    return latencies
                return one_round

            for key in servers:  # warm-up: loads the en-de expert set, fills allocator caches
                runner(key)()
            rounds = timing.interleaved_rounds({key: runner(key) for key in servers}, options.rounds)
            row = {"same_translations": outputs["server_full"] == outputs["extracted_alone"]}
            for key, per_round in rounds.items():
                every = [s for latencies in per_round for s in latencies]
                row[key] = {
                    "round_seconds": [sum(latencies) for latencies in per_round],
                    "requests_per_s": timing.median([len(latencies) / sum(latencies) for latencies in per_round]),
                    "p50_ms": 1000 * percentile(every, 50), "p90_ms": 1000 * percentile(every, 90),
                    "p99_ms": 1000 * percentile(every, 99),
                }
            row["speed_ratio_server_vs_extracted"] = timing.paired_ratio(
                row["server_full"]["round_seconds"], row["extracted_alone"]["round_seconds"])
            results[f"batch_{batch}"] = row
            run.log(f"batch {batch}: server {row['server_full']['requests_per_s']:.1f} req/s, extracted alone "
                    f"{row['extracted_alone']['requests_per_s']:.1f} req/s, ratio {row['speed_ratio_server_vs_extracted']:.2f}")
    finally:
        for server in servers.values():
            server.stop()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="data, checkpoints and extractions (kept for reuse); required")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks", "serving.json"))
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--routing", default="token/target", help="encoder/decoder routing (default token/target)")
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--max-len-b", type=int, default=20)
    parser.add_argument("--requests", type=int, default=30, help="requests per round and setting")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 requests (a smoke run)")
    parser.add_argument("--child-full", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child_full:
        return child_full(json.loads(options.child_full))
    if not options.workdir:
        parser.error("--workdir is required")
    if options.quick:
        options.rounds, options.requests = 2, 8
    config = {key: getattr(options, key) for key in ("experts", "routing", "updates", "beam", "max_len_b", "requests", "rounds", "threads")}
    config.update(model="taskmoe_transformer_small, 6+6 layers, d 256, FFN 1024, MoE every other layer, top-2", pairs=ORDER)
    run = timing.Run("serving", __file__, argv, options.threads, config)
    os.makedirs(options.workdir, exist_ok=True)
    paths = prepare(options.workdir, options, run.log)
    run.record["results"]["files_mib"] = {
        "full": os.path.getsize(paths["full"]) / 2**20,
        "extracted_en-de": os.path.getsize(os.path.join(paths["extracted"], "en-de.pt")) / 2**20,
    }
    run.record["results"]["memory"] = measure_memory(run, paths, options)
    run.record["results"]["speed"] = measure_speed(run, paths, options)
    run.write(options.out)


if __name__ == "__main__":
    main()
