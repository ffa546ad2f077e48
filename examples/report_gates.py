"""Markdown from the records of ``examples/measure_gates.py`` (task-gate diagnostics, issue #12):
per task-routed layer, each task's expert set and top-1 probability at every checkpoint, the tasks
whose set changed between checkpoints, and the experts every two tasks share at the last one.
Nothing is measured here.

Usage::

    python examples/report_gates.py docs/quickstart/gates*.json --out docs/quickstart/gates.md
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from taskmoe_fairseq.files import atomic_write_text  # noqa: E402


def layer_tables(record: dict, layer: str):
    series = record["series"]
    entry = series[0]["layers"][layer]
    num_experts = len(next(iter(entry["tasks"].values()))["probs"])
    lines = [f"### {layer} ({entry['routing']} routing, E = {num_experts}, k = {series[0]['top_k']})", "",
             f"Expert set and top-1 probability per {entry['task_key']} (uniform would be {1 / num_experts:.3f}):", ""]
    header = "| task | " + " | ".join(f"{point['updates']} updates" for point in series) + " |"
    lines += [header, "|---" * (len(series) + 1) + "|"]
    for task in entry["tasks"]:
        cells = []
        for point in series:
            t = point["layers"][layer]["tasks"][task]
            cells.append("{" + ",".join(str(e) for e in t["experts"]) + f"}} p1 {t['top1_prob']:.2f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    mean_p1 = [sum(t["top1_prob"] for t in point["layers"][layer]["tasks"].values()) / len(entry["tasks"]) for point in series]
    lines.append("| **mean p1** | " + " | ".join(f"{p:.2f}" for p in mean_p1) + " |")
    lines += ["", "Tasks whose expert set (top-1 expert) changed between checkpoints:", ""]
    for step in record["changes"][layer]:
        sets = ", ".join(step["set_changed"]) or "none"
        top1 = ", ".join(step["top1_changed"]) or "none"
        lines.append(f"* {step['from']} -> {step['to']}: set {len(step['set_changed'])}/{len(entry['tasks'])} ({sets}); "
                     f"top-1 {len(step['top1_changed'])}/{len(entry['tasks'])} ({top1})")
    last = record["overlap_at_last"][layer]
    lines += ["", f"At {series[-1]['updates']} updates: experts in use {last['experts_in_use']} "
              f"({len(last['experts_in_use'])} of {num_experts}); experts shared by two tasks, mean "
              f"{last['mean_shared']:.2f} of {series[0]['top_k']}:", ""]
    tasks = list(entry["tasks"])
    lines += ["| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for a in tasks:
        row = []
        for b in tasks:
            key = f"{min(a, b)}/{max(a, b)}"
            row.append("-" if a == b else str(last["shared"][key]))
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    return lines


def markdown(records, title: str) -> str:
    lines = [f"# {title}", "", "Produced by `python examples/report_gates.py` from the records of "
             "`examples/measure_gates.py` named below; each section is one training run.", ""]
    for record in records:
        lines += [f"## {record.get('name', 'run')}", "",
                  f"`{record['command']}` ({record['date']}, torch {record['torch']}).", ""]
        for layer in record["series"][0]["layers"]:
            lines += layer_tables(record, layer) + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", help="JSON records of measure_gates.py, one per run")
    parser.add_argument("--out", required=True, help="the markdown file to write")
    parser.add_argument("--title", default="Task-gate diagnostics")
    options = parser.parse_args(argv)
    records = []
    for path in options.records:
        with open(path, encoding="utf-8") as stream:
            records.append(json.load(stream))
    atomic_write_text(options.out, markdown(records, options.title))
    print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
