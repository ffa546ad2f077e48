"""docs/benchmarks/ddp_backend_cost.md from the record of measure_ddp_backend.py: words/s,
updates/s and CPU seconds per backend, the per-round ratios, and what the rounds show.
Nothing is measured here; ``report.py`` calls :func:`markdown`."""

import statistics

TITLES = {"ddp_backend_cost": "# DDP backend cost, 2 CPU ranks (gloo)",
          "expert_parallel_speed": "# Expert parallelism vs data parallelism, 2 CPU ranks (gloo)"}
SAME_CPU = 0.05  # CPU time within 5%: a slower backend waited rather than computed more


def markdown(record: dict) -> str:
    env, config, results = record["environment"], record["config"], record["results"]
    backends, rounds, medians = config["backends"], results["rounds"], results["medians"]
    reference = backends[0]
    per_backend = {b: [r for r in rounds if r["backend"] == b] for b in backends}
    ratios = {b: statistics.median(m["wps"] / r["wps"] for m, r in zip(per_backend[b], per_backend[reference]))
              for b in backends}
    lines = [
        TITLES.get(record["kind"], TITLES["ddp_backend_cost"]), "",
        f"`{env['command']}`", "",
        f"{config['arch']}, E = {config['experts']}, token/target, {config['updates']} updates of "
        f"{config['tokens_per_rank']:,} tokens per rank, {config['rounds']} interleaved rounds; {env['cpu']}, "
        f"{env['cores']} cores, {config['threads_per_rank']} thread per rank; torch {env['torch']}; {env['date']}", "",
        "words/s and updates/s: fairseq's end-of-epoch train line; CPU s: user + system time of the launcher "
        f"and both ranks, start-up included; ratio: words/s against {reference} in the same round.", "",
        f"| backend | words/s (median) | updates/s (median) | CPU s (median) | words/s vs {reference}"
        " (median of per-round ratios) | rounds (words/s) |",
        "|---|---|---|---|---|---|",
    ]
    for b in backends:
        m = medians[b]
        per_round = ", ".join(f"{r['wps']:.0f}" for r in per_backend[b])
        lines.append(f"| {b} | {m['wps']:.0f} | {m['ups']:.2f} | {m['cpu_s']:.1f} | {ratios[b]:.2f}x | {per_round} |")
    deviations = [r["wps"] / medians[r["backend"]]["wps"] - 1 for r in rounds]
    spread = (f"Single rounds ran at {min(deviations):+.0%} to {max(deviations):+.0%} of their backend's median "
              "words/s")
    if "load_average_at_end" in env:
        spread += (f" (load average {', '.join(f'{x:.2f}' for x in env['load_average_at_start'])} at start, "
                   f"{', '.join(f'{x:.2f}' for x in env['load_average_at_end'])} at end)")
    reading = [spread + "; interleaving the backends and taking medians is what makes the comparison usable."]
    for b in backends[1:]:
        cpu, reference_cpu = medians[b]["cpu_s"], medians[reference]["cpu_s"]
        unused = " with `find_unused_parameters=True`" if all(r.get("find_unused") for r in per_backend[b]) else ""
        sentence = (f"`{b}`{unused} ran at {ratios[b]:.2f}x the words/s of `{reference}`, at {cpu:.1f} vs "
                    f"{reference_cpu:.1f} CPU s per run (start-up included)")
        if ratios[b] < 1 and abs(cpu / reference_cpu - 1) <= SAME_CPU:
            sentence += ": the same CPU time, so the cost is waiting, not extra computation"
        if "wall_s" in medians[b]:  # records since 2026-12-02: the whole launch, start-up included
            pairs = zip(per_backend[b], per_backend[reference])
            sentence += (f"; the whole launch took {medians[b]['wall_s']:.1f} vs {medians[reference]['wall_s']:.1f} s "
                         f"(median of per-round ratios {statistics.median(m['wall_s'] / r['wall_s'] for m, r in pairs):.2f}x)")
        reading.append(sentence + ".")
    lines += ["", " ".join(reading + list(config.get("notes", []))), ""]
    if record.get("converted"):
        lines += [f"Record: {record['converted']}", ""]
    return "\n".join(lines)
