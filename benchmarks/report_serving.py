"""Turn the record of measure_serving.py into docs/benchmarks/serving.md. Nothing is measured here.

    PYTHONPATH=. python benchmarks/report_serving.py docs/benchmarks/serving.json --out docs/benchmarks
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import table  # noqa: E402
from timing import SCHEMA  # noqa: E402


def load(path):
    with open(path) as stream:
        record = json.load(stream)
    if record.get("schema") != SCHEMA or record.get("kind") != "serving":
        raise SystemExit(f"{path}: not a serving record of schema {SCHEMA} (kind {record.get('kind')!r})")
    return record


def render(record) -> str:
    env, config, results = record["environment"], record["config"], record["results"]
    memory, speed = results["memory"], results["speed"]
    alone = memory["extracted_alone_mib"]
    full = memory["full_model_process"]["rss_mib"]
    lines = [
        "# One server for every pair: what it costs",
        "",
        f"Produced by `{env['command']}` on {env['date']} ({env['cpu']}, {env['cores']} cores, "
        f"{env['torch_threads']} torch thread(s) per process; load average {env['load_average_at_start'][0]:.1f} at the "
        f"start, {env.get('load_average_at_end', [float('nan')])[0]:.1f} at the end), then "
        f"`python benchmarks/report_serving.py`. Python {env['python']}, torch {env['torch']}, fairseq {env['fairseq']}.",
        "",
        f"Model: {config['model']}, E = {config['experts']}, routing {config['routing']}, {config['updates']} update(s) of "
        f"`fairseq-train` on the bundled 12-direction slice (memory and speed only: the weights are barely trained). "
        f"Checkpoint {results['files_mib']['full']:.0f} MiB (no optimizer state), extracted en-de "
        f"{results['files_mib']['extracted_en-de']:.0f} MiB.",
        "",
    ]
    if max(env["load_average_at_start"][0], env.get("load_average_at_end", [0])[0]) > env["cores"]:
        lines += ["**The machine was loaded (load average above its core count): the speed figures below are not "
                  "reliable; rerun the command on a quiet machine.** Resident memory does not depend on the load.", ""]
    if "--quick" in env["command"]:
        lines += ["This is a `--quick` run (2 rounds of 8 requests): a smoke run, not a measurement of speed.", ""]
    lines += [
        "## Resident memory",
        "",
        "`VmRSS` of each process after its requests (4 sentences per pair, "
        f"beam {config['beam']}, at most {config['max_len_b']} tokens); one process at a time.",
        "",
    ]
    rows = [
        ["server, started (no pair yet)", f"{memory['server_started_mib']:.0f}", ""],
        ["server, 1 pair in use", f"{memory['server_1_pairs_mib']:.0f}", ""],
        ["server, 6 pairs in use", f"{memory['server_6_pairs_mib']:.0f}", ""],
        ["server, 12 pairs in use", f"{memory['server_12_pairs_mib']:.0f}",
         f"{memory['server_expert_sets_12_pairs']} expert sets (pairs with one target share one)"],
        ["12 extracted checkpoints, one process each (sum)", f"{memory['extracted_12_processes_mib']:.0f}",
         f"{min(alone.values()):.0f}-{max(alone.values()):.0f} MiB each"],
        ["the full model in one process (every expert)", f"{full:.0f}", "translate.load_translator on the full checkpoint"],
    ]
    lines += table(["what", "MiB", "note"], rows)
    lines += [
        "",
        f"The server with all 12 pairs in use holds {memory['server_12_pairs_mib'] / memory['extracted_12_processes_mib']:.1%} "
        f"of what 12 separate processes hold, and {memory['server_12_pairs_mib'] / full:.1%} of the full model's process.",
        "",
        "## Requests per second and latency, en-de",
        "",
        f"Sequential requests ({config['requests']} per round and setting, {config['rounds']} interleaved rounds), beam "
        f"{config['beam']}, at most {config['max_len_b']} tokens: the server on the full checkpoint vs the extracted "
        "en-de checkpoint served alone by the same command. Requests/s: median over rounds; ratio: median of the "
        "per-round ratios (> 1: the server is faster); latency percentiles over every request.",
        "",
    ]
    rows = []
    for batch in ("batch_1", "batch_16"):
        row = speed[batch]
        for key, label in (("server_full", "server (full checkpoint)"), ("extracted_alone", "extracted en-de alone")):
            r = row[key]
            rows.append([batch.replace("_", " "), label, f"{r['requests_per_s']:.2f}", f"{r['p50_ms']:.0f}",
                         f"{r['p90_ms']:.0f}", f"{r['p99_ms']:.0f}",
                         f"{row['speed_ratio_server_vs_extracted']:.2f}x" if key == "server_full" else "",
                         "yes" if row["same_translations"] else "**no**"])
    lines += table(["batch", "process", "requests/s", "p50 ms", "p90 ms", "p99 ms", "server / extracted", "same output"], rows)
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record")
    parser.add_argument("--out", default="docs/benchmarks")
    options = parser.parse_args(argv)
    text = render(load(options.record))
    os.makedirs(options.out, exist_ok=True)
    path = os.path.join(options.out, "serving.md")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
