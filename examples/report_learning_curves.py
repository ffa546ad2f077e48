#!/usr/bin/env python3
"""Report of ``examples/learning_curves.py``'s measurement: a markdown table (chrF and BLEU
averages with 95% paired-bootstrap intervals, the difference from dense, at every point) and the
learning-curve plot, beside the JSON they are made from.

Usage::

    python examples/report_learning_curves.py docs/learning_curves/learning_curves.json
    # -> docs/learning_curves/learning_curves.md, learning_curves.png
"""

import argparse
import io
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "examples")]
from data.script_support import atomic_write_bytes  # noqa: E402
from quickstart import PAIRS  # noqa: E402


def training_time(result):
    seconds = [s for s in result.get("train_seconds", {}).values() if s]
    if not seconds:
        return "training time not recorded"
    return f"training {min(seconds) / 60:.0f}-{max(seconds) / 60:.0f} min per configuration (fairseq-train's log)"


def with_interval(value, bounds, digits, sign=""):
    """``value [low, high]`` at ``digits`` decimals (``sign="+"``: signed, for differences)."""
    low, high = bounds
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def cell(row, metric, digits):
    return with_interval(row[f"{metric}_avg"], row[f"{metric}_avg_ci95"], digits)


def difference(row, metric, baseline, digits):
    key = f"{metric}_minus_{baseline}"
    return with_interval(row[key], row[key + "_ci95"], digits, "+") if key in row else "—"


def table(result):
    """Markdown lines: one row per configuration and point."""
    baseline = result["baseline"]
    lines = [f"| routing (encoder / decoder) | updates | chrF avg [95% CI] | Δ chrF vs {baseline} [95% CI] | "
             f"BLEU avg [95% CI] | Δ BLEU vs {baseline} [95% CI] | chrF xx→en / en→xx |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in result["configs"].items():
        for updates in result["points"]:
            row = rows[str(updates)]
            lines.append(f"| {name} | {updates} | {cell(row, 'chrf', 1)} | {difference(row, 'chrf', baseline, 1)} | "
                         f"{cell(row, 'bleu', 2)} | {difference(row, 'bleu', baseline, 2)} | "
                         f"{row['chrf_xx_en']:.1f} / {row['chrf_en_xx']:.1f} |")
    return lines


def ranking(result):
    """Per point, the configurations ordered by average chrF (best first)."""
    lines = []
    for updates in result["points"]:
        order = sorted(result["configs"], key=lambda name: -result["configs"][name][str(updates)]["chrf_avg"])
        lines.append(f"* {updates} updates: " + " > ".join(
            f"{name} ({result['configs'][name][str(updates)]['chrf_avg']:.1f})" for name in order))
    return lines


def remedies(result):
    """Markdown lines: each task-gate remedy against its plain configuration, per point."""
    lines = []
    for name, entry in result.get("remedies", {}).items():
        lines += [f"{name} against {entry['against']} (same resamples):", "",
                  "| updates | Δ chrF [95% CI] | Δ BLEU [95% CI] |", "|---|---|---|"]
        for updates in result["points"]:
            row = entry["points"][str(updates)]
            lines.append(f"| {updates} | {difference(row, 'chrf', 'plain', 1)} | {difference(row, 'bleu', 'plain', 2)} |")
        lines.append("")
    return lines


def per_direction(result):
    last = str(result["points"][-1])
    lines = [f"| routing | " + " | ".join(PAIRS) + " |", "|---|" + "---|" * len(PAIRS)]
    for name, rows in result["configs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{rows[last]['per_direction'][p]['chrf']:.1f}" for p in PAIRS) + " |")
    return lines


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for axis, metric, label in zip(axes, ("chrf", "bleu"), ("chrF", "BLEU")):
        for name, rows in result["configs"].items():
            xs = result["points"]
            ys = [rows[str(u)][f"{metric}_avg"] for u in xs]
            lows = [rows[str(u)][f"{metric}_avg_ci95"][0] for u in xs]
            highs = [rows[str(u)][f"{metric}_avg_ci95"][1] for u in xs]
            axis.plot(xs, ys, marker="o", label=name)
            axis.fill_between(xs, lows, highs, alpha=0.15)
        axis.set_xlabel("updates (4,096-token batches)")
        axis.set_ylabel(f"{label}, average of 12 directions (sacrebleu)")
        axis.set_title(f"{label} along training, 95% paired-bootstrap bands")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="learning_curves.json from examples/learning_curves.py")
    options = parser.parse_args(argv)
    try:
        result = json.load(open(options.json))
    except (OSError, ValueError) as error:
        sys.exit(f"report_learning_curves: cannot read {options.json}: {error}")
    if not result.get("points"):
        sys.exit(f"report_learning_curves: {options.json} has no point that every configuration reached")
    folder = os.path.dirname(os.path.abspath(options.json))
    plot(result, os.path.join(folder, "learning_curves.png"))
    opts = result["options"]
    signatures = result["signatures"]
    text = [
        "# Routing comparison as learning curves",
        "",
        f"Command: `{result['command']}`, then `python examples/report_learning_curves.py {options.json}`  ",
        f"Date: {result['date']}; hardware: {result['hardware']}; {result['jobs']} configurations trained at once, "
        f"{result['threads_per_job']} thread each; {training_time(result)}; this invocation took "
        f"{result['wall_seconds'] / 60:.0f} min (finished trainings and decoded points are reused).  ",
        f"Recipe: the quickstart's (`quickstart.RECIPE`), only the routing differs (dense: E = k = 2, static). "
        f"{opts['updates']} updates, a checkpoint every {opts['updates'] // opts['points']}; decoding beam "
        f"{opts['beam']} on the first {opts['test_lines']} sentences of each of the 12 test sets (in-process hub).  ",
        f"Intervals: 95%, paired bootstrap, 1,000 resamples of the sentence indices shared by all directions, "
        f"configurations and points. BLEU: " + "; ".join(f"`{s}`" for s in signatures["bleu"].values())
        + f"; chrF: `{signatures['chrf']}`.",
        "",
        *table(result),
        "",
        "Ordering by average chrF at each point:",
        "",
        *ranking(result),
        "",
        *remedies(result),
        f"chrF per direction at {result['points'][-1]} updates:",
        "",
        *per_direction(result),
        "",
        "![learning curves](learning_curves.png)",
    ]
    atomic_write_bytes(os.path.join(folder, "learning_curves.md"), ("\n".join(text) + "\n").encode("utf-8"))
    print("\n".join(table(result) + [""] + ranking(result)))
    print(f"wrote {folder}/learning_curves.md, learning_curves.png")


if __name__ == "__main__":
    main()
