"""docs/benchmarks/gpu_check.md from the record of gpu_check.py: each step, its status and what
it found. Nothing is measured here; ``report.py`` calls :func:`markdown`."""


def _finding(entry: dict) -> str:
    if entry["status"] != "ok":
        return "; ".join(entry.get("error", [])) or "-"
    if "losses" in entry:
        losses = entry["losses"]
        return (f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, finite: {'yes' if entry['finite'] else 'NO'}, "
                f"falling: {'yes' if entry['falling'] else 'NO'}") if losses else "no loss logged"
    if "median_words_per_second" in entry:
        ratio = entry.get("vs_dense")
        return f"{entry['median_words_per_second']:,.0f} words/s" + (f" ({ratio:.2f}x dense)" if ratio else "")
    for key in ("identical_share", "identical_to_generate_share"):
        if key in entry:
            return f"{entry[key]:.1%} of hypotheses identical"
    return "-"


def markdown(record: dict) -> str:
    env, steps = record["environment"], record["results"]["steps"]
    where = env.get("gpu") or "no GPU (plan only)"
    lines = [
        "# GPU check", "",
        f"`{env['command']}`", "",
        f"{where}; CUDA {env.get('cuda')}; torch {env['torch']}; {env['cpu']}, {env['cores']} cores; {env['date']}"
        + (f"; {record['wall_seconds'] / 60:.1f} min in all." if "wall_seconds" in record else "."), "",
        "| step | status | seconds | found |", "|---|---|---|---|",
    ]
    for entry in steps:
        lines.append(f"| {entry['name']} | {entry['status']} | {entry.get('seconds', '-')} | {_finding(entry)} |")
    lines += ["", "Commands of each step: the record's `steps[].commands`.", ""]
    return "\n".join(lines)
