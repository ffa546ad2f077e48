"""docs/benchmarks/ct2_export.md from the record of measure_ct2_export.py: tokens/s of fairseq
and the three CTranslate2 models per setting, the targets as PASS/MISS, sizes and peak memory.
Nothing is measured here; ``report.py`` calls :func:`markdown`."""

import statistics

from measure_ct2_export import ENGINES  # standard library only: no torch here

TARGET_OVER_FAIRSEQ = 2.5  # CT2 float32 / fairseq at beam 4, batch 64
TARGET_OVER_STOCK = 0.95  # CT2 float32 export / CT2 stock dense transformer, every setting


def machine(env: dict) -> str:
    """CPU, cores and the versions recorded (a record from before the split has no torch)."""
    versions = [f"{name} {env[name]}" for name in ("ctranslate2", "fairseq", "torch", "python") if name in env]
    return ", ".join([env["cpu"], f"{env['cores']} cores", *versions])


def load(values) -> str:
    return " ".join(f"{value:.2f}" for value in values)


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def paired_ratio(runs: dict, engine: str, reference: str) -> float:
    """Median over rounds of engine's tokens/s / reference's tokens/s in the same round."""
    rate = {e: [r["tokens"] / r["seconds"] for r in runs[e]] for e in (engine, reference)}
    return statistics.median(a / b for a, b in zip(rate[engine], rate[reference]))


def markdown(record: dict) -> str:
    env, config, results = record["environment"], record["config"], record["results"]
    lines = [
        "# CTranslate2 export: decoding speed vs fairseq", "",
        f"Produced by `{env['command']}` on {env['date']} ({machine(env)}; load average at start "
        f"{load(env['load_average_at_start'])}, at end {load(env['load_average_at_end'])}). Untrained weights, every "
        f"sentence decoded to exactly {config['length'] + 1} tokens (see `benchmarks/measure_ct2_export.py`); median of "
        f"{config['rounds']} interleaved rounds; tokens/s counts output tokens.", "",
    ]
    if record.get("converted"):
        lines += [f"Record: {record['converted']}", ""]
    lines += [
        "| beam | batch | threads | fairseq tok/s | CT2 float32 | CT2 int8 | stock CT2 | float32 / fairseq | int8 / fairseq | float32 / stock |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = results["rows"]
    for key, row in rows.items():
        beam, batch, threads = (int(part.lstrip("beamtchrads")) for part in key.split("_"))
        t = row["tokens_per_s"]
        lines.append(f"| {beam} | {batch} | {threads} | {t['fairseq']:.0f} | {t['ct2_float32']:.0f} | {t['ct2_int8']:.0f} | "
                     f"{t['stock_ct2']:.0f} | {row['ct2_float32_over_fairseq']:.2f}x | {row['ct2_int8_over_fairseq']:.2f}x | "
                     f"{row['ct2_float32_over_stock_ct2']:.2f}x |")
    lines += ["", "Targets:", ""]
    for key in ("beam4_batch64_threads1", "beam4_batch64_threads2"):
        value = rows[key]["ct2_float32_over_fairseq"]
        stock = paired_ratio(results["runs"][key], "stock_ct2", "fairseq")
        lines.append(f"* {key}: CT2 float32 / fairseq = {value:.2f}x (target >= {TARGET_OVER_FAIRSEQ}x): "
                     f"{verdict(value >= TARGET_OVER_FAIRSEQ)}; stock CT2 on the dense transformer / fairseq in the "
                     f"same rounds: {stock:.2f}x")
    worst_key, worst = min(rows.items(), key=lambda kv: kv[1]["ct2_float32_over_stock_ct2"])
    value = worst["ct2_float32_over_stock_ct2"]
    lines.append(f"* CT2 float32 export / CT2 stock dense transformer, worst setting ({worst_key}): "
                 f"{value:.2f}x (target >= {TARGET_OVER_STOCK}x): {verdict(value >= TARGET_OVER_STOCK)}")
    lines += ["", "| model | size on disk (MiB) | peak RSS, load + one beam-4 batch of 64 (MiB) | peak after imports only (MiB) |",
              "|---|---|---|---|"]
    for engine in ENGINES:
        m = results["memory"][engine]
        lines.append(f"| {engine} | {results['sizes_mib'][engine]:.1f} | {m['peak_mib']:.0f} | {m['after_imports_mib']:.0f} |")
    lines += ["", "fairseq's size is the extracted merged checkpoint (`--merge-experts`); CT2 sizes are the model folders.", ""]
    return "\n".join(lines)
