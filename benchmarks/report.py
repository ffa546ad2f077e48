"""Turn the JSON records of the measuring scripts into the markdown (and plot) under docs/benchmarks:

* decoding, training, memory (measure_decoding/training/memory.py) -> serving_cost.md (tables,
  the bars as PASS/MISS, where the time goes) and serving_cost.png;
* ct2_export (measure_ct2_export.py) -> ct2_export.md (report_ct2_export.py);
* ddp_backend_cost / expert_parallel_speed (measure_ddp_backend.py) -> <kind>.md (report_ddp_backend.py);
* sharded_extraction (measure_sharded_extraction.py) -> sharded_extraction.md (report_sharded_extraction.py);
* gpu_check (gpu_check.py) -> gpu_check.md (report_gpu_check.py).

    PYTHONPATH=. python benchmarks/report.py docs/benchmarks/*.json --out docs/benchmarks

Any subset of the records works; serving_cost sections without their record are left out.
Nothing is measured here.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report_bars  # noqa: E402
import report_ct2_export  # noqa: E402
import report_ddp_backend  # noqa: E402
import report_gpu_check  # noqa: E402
import report_sharded_extraction  # noqa: E402
from models import DENSE_KEYS, LABELS  # noqa: E402
from report_bars import HEADLINE, SETTINGS, experts_of  # noqa: E402
from report_plot import write_plot  # noqa: E402
from timing import SCHEMA, median  # noqa: E402

from taskmoe_fairseq.files import atomic_write_text  # noqa: E402  (models put the repository on sys.path)

KINDS = ("decoding", "training", "memory")  # serving_cost.md
SINGLE = {"ct2_export": report_ct2_export.markdown, "ddp_backend_cost": report_ddp_backend.markdown,
          "expert_parallel_speed": report_ddp_backend.markdown,
          "sharded_extraction": report_sharded_extraction.markdown,
          "gpu_check": report_gpu_check.markdown}  # kind.md each


def load(paths):
    records = {}
    for path in paths:
        with open(path) as stream:
            record = json.load(stream)
        if record.get("schema") != SCHEMA or record.get("kind") not in KINDS + tuple(SINGLE):
            raise SystemExit(f"{path}: not a benchmark record of schema {SCHEMA} (kind {record.get('kind')!r})")
        records[record["kind"]] = record
    return records


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def mib(num_bytes):
    return num_bytes / 2**20


def size_row(records, e, key):
    memory = records.get("memory")
    if not memory:
        return None
    return memory["results"]["dense"].get(key) if key in DENSE_KEYS else memory["results"].get(str(e), {}).get(key)


def profile_line(p):
    total = p["total"] or float("nan")
    ops = ", ".join(f"`{op['op']}` {op['self_ms']:.0f} ms" for op in p.get("top_ops", []))
    return (
        f"gate {p['gate']:.0f} ms ({p['gate'] / total:.1%}), dispatch {p['dispatch']:.0f} ms ({p['dispatch'] / total:.1%}), "
        f"experts {p['experts']:.0f} ms ({p['experts'] / total:.1%}) of {total:.0f} ms; top ops: {ops}"
    )


def header_lines(records, command):
    out = ["# Serving and training cost: TaskMoE vs token-level MoE vs dense", ""]
    out.append(f"Written by `{command}` from these records (each made by the command shown, in one process):")
    out.append("")
    for kind in KINDS:
        r = records.get(kind)
        if r:
            env = r["environment"]
            load = ", ".join(f"{x:.2f}" for x in env["load_average_at_start"])
            out.append(
                f"- {kind}: `{env['command']}`, {env['date']}, {r['wall_seconds'] / 60:.1f} min; {env['cpu']}, {env['cores']} "
                f"cores, torch threads {env['torch_threads']}; Python {env['python']}, torch {env['torch']}, fairseq "
                f"{env['fairseq']}; load average at start {load}"
            )
    shape = next(iter(records.values()))["config"]["shape"]
    out += ["", (
        f"Model shape (untrained weights, same for all): {shape['layers']}+{shape['layers']} layers, d_model "
        f"{shape['embed_dim']}, FFN {shape['ffn_dim']}, {shape['heads']} heads, shared vocabulary {shape['vocab']}, MoE FFN "
        f"in every {shape['moe_freq']}nd layer, top-{shape['top_k']}, 7 languages; the extracted models are "
        f"`full_token_target.extract(\"en-de\", merge=False/True)`."
    )]
    decode = records.get("decoding")
    if decode:
        c = decode["config"]
        out.append(
            f"Decoding: en-de, sources of {shape['src_len'] - 6}-{shape['src_len']} tokens, exactly {c['tgt_len']} tokens + "
            f"`</s>` per sentence (fairseq's `SequenceGenerator`), {c['rounds']} interleaved round(s); batch-1 rows decode "
            f"{c['batch1_sentences']} sentences one at a time."
        )
    train = records.get("training")
    if train:
        out.append(
            f"Training: {train['config']['sentences']} sentences ({train['ntokens']} target tokens) per step of mixed "
            f"directions, {train['config']['rounds']} interleaved round(s)."
        )
    return out + [""]


def decoding_lines(records):
    decode = records["decoding"]
    out = ["## Decoding, greedy b64 (headline)", "",
           "Throughput is the median over rounds; `x dense K*ffn` and `x token/token` are medians of per-round ratios "
           "(same round, same machine load). Sizes and peak RSS come from the memory record.", ""]
    rows = []
    for e in experts_of(decode):
        for key, model in decode["results"][str(e)]["models"].items():
            s = model["settings"][HEADLINE]
            size = size_row(records, e, key)
            rows.append([
                e, LABELS[key], f"{s['sentences_per_s']:.1f}", f"{s['tokens_per_s']:.0f}", f"{s['ratio_vs_dense_kffn']:.2f}",
                f"{s['ratio_vs_full_token_token']:.2f}",
                f"{size['params'] / 1e6:.1f}M" if size else "-",
                f"{mib(size['checkpoint_bytes']):.0f}" if size else "-",
                f"{size['memory']['peak_rss_mb']:,.0f}" if size else "-",
            ])
    out += table(["E", "model", "sentences/s", "tokens/s", "x dense K*ffn", "x full token/token", "params", "checkpoint MiB", "peak RSS MiB"], rows)
    out += ["", "## Decoding, every setting (tokens/s, sentences/s, and speed relative to dense K*ffn)", ""]
    rows = []
    for e in experts_of(decode):
        for key, model in decode["results"][str(e)]["models"].items():
            cells = [f"{s['tokens_per_s']:.0f} tok/s, {s['sentences_per_s']:.1f} sent/s ({s['ratio_vs_dense_kffn']:.2f})"
                     for s in (model["settings"][name] for name in SETTINGS)]
            rows.append([e, LABELS[key]] + cells)
    out += table(["E", "model"] + SETTINGS, rows)
    out += ["", "Raw seconds per round, encoder and decoder milliseconds per sentence and ratios to every reference are in "
            "`decoding.json` (`results.<E>.models.<model>.settings.<setting>`).", ""]
    return out


def memory_lines(records):
    memory = records["memory"]
    beam = memory["config"]["decode_beam"]
    out = ["## Size and memory", "",
           "Peak RSS: each model in a fresh interpreter that imports torch + fairseq + the plugin, reads the checkpoint "
           f"(`torch.load`), builds the model, loads the state, drops it and decodes one batch of 64 (beam {beam}). Peak = "
           "`VmHWM` of that process; `after decode` is VmRSS at the end, `baseline` after the imports.", ""]
    rows = []
    for e in experts_of(memory):
        for key in LABELS:
            size = size_row(records, e, key)
            m = size["memory"]
            rows.append([e, LABELS[key], f"{size['params']:,}",
                         f"{size['decoder_expert_params']:,}" if size["decoder_expert_params"] else "-",
                         f"{mib(size['checkpoint_bytes']):.1f}", f"{m['baseline_rss_mb']:,.0f}", f"{m['rss_after_decode_mb']:,.0f}",
                         f"{m['peak_rss_mb']:,.0f}"])
    out += table(["E", "model", "params", "decoder MoE-slot FFN params", "checkpoint MiB", "baseline MiB", "after decode MiB", "peak MiB"], rows)
    out.append("")
    decode = records.get("decoding")
    for e in experts_of(memory):
        full, x = memory["results"][str(e)]["full_token_target"], memory["results"][str(e)]["extracted"]
        line = (f"- E={e}: decoder expert parameters {full['decoder_expert_params']:,} -> {x['decoder_expert_params']:,} "
                f"({full['decoder_expert_params'] / x['decoder_expert_params']:.0f}x smaller); whole model "
                f"{full['params'] / x['params']:.2f}x smaller (the token-routed encoder stays whole).")
        if decode and str(e) in decode["results"]:
            models = decode["results"][str(e)]["models"]
            line += (f" Extracted greedy-b64 hypotheses identical to the full model's: "
                     f"{models['extracted']['identical_to_full_token_target']:.0%} (plain), "
                     f"{models['extracted_merged']['identical_to_full_token_target']:.0%} (merged).")
        out.append(line)
    return out + [""]


def training_lines(records):
    train = records["training"]
    out = ["## Training (forward + backward + Adam step)", "",
           "Words/s = target tokens per second of one fairseq-style train step (criterion with gate loss, backward, grads x "
           "1/sample_size, grad norm, fairseq's Adam, grads set to None). Each MoE model alternates step by step with the "
           "two dense models; ratios are medians of per-round ratios. `update ms` is the part after backward, which scales "
           "with the parameters that received a gradient (`params updated`); `fwd+bwd only` is the ratio without it.", ""]
    rows = []
    for e in experts_of(train):
        for routing, row in train["results"][str(e)].items():
            p, total = row["profile"], row["profile"]["total"] or float("nan")
            rows.append([e, routing, f"{row['words_per_s']:.0f}", f"{row['ratio_vs_dense_kffn']:.2f}", f"{row['fb_ratio_vs_dense_kffn']:.2f}",
                         f"{row['ratio_vs_dense']:.2f}",
                         f"{median(row['update_seconds']) * 1e3:.0f} ({median(row['dense_kffn_update_seconds_same_rounds']) * 1e3:.0f})",
                         f"{row['params'] / 1e6:.1f}M", f"{row['params_with_adam_state'] / 1e6:.1f}M",
                         f"{p['gate'] / total:.1%}", f"{p['dispatch'] / total:.1%}", f"{p['experts'] / total:.1%}"])
    out += table(["E", "routing (enc/dec)", "words/s", "x dense K*ffn", "x dense K*ffn, fwd+bwd only", "x dense ffn",
                  "update ms (dense K*ffn)", "params", "params updated", "gate", "dispatch", "experts"], rows)
    refs = train["dense_words_per_s"]
    out += ["", f"Dense references (median over all their steps): {LABELS['dense_kffn']} {refs['dense_kffn']:.0f} words/s, "
            f"{LABELS['dense']} {refs['dense']:.0f} words/s.", ""]
    return out


def profile_lines(records):
    out = ["## Where the time goes", "",
           "Method (benchmarks/profiling.py): on the model instances only, every MoE layer, its token gate, the router's "
           "per-sentence gates and each expert are wrapped in `torch.profiler.record_function` scopes. `gate` = token gates "
           "+ router gates (the router decides once per forward, in the encoder), `experts` = expert FFNs (dense: fc1+fc2 at "
           "the MoE positions), `dispatch` = the rest of the MoE layers. Backward nodes are charged to the scope of the "
           "forward op that created them. Shares are of the profiled generate call / step.", ""]
    decode = records.get("decoding")
    for e in experts_of(decode):
        for key, p in decode["results"][str(e)]["profiles"].items():
            out.append(f"- decode E={e}, {LABELS[key]}, {HEADLINE}: {profile_line(p)}")
    out.append("")
    train = records.get("training")
    for e in experts_of(train):
        for routing, row in train["results"][str(e)].items():
            out.append(f"- train E={e}, {routing}: {profile_line(row['profile'])}")
    return out + [""]


METHOD = [
    "## Method", "",
    "- Measuring and reporting are separate: `measure_decoding.py`, `measure_training.py` and `measure_memory.py` write "
    "JSON records (command, hardware, date, versions, every round's raw seconds); this file is written from them by "
    "`report.py`. Nothing is asserted on time; the bars are evaluated on the measured ratios.",
    "- All compared runs are in one process, interleaved: every round runs every model once per setting and the order "
    "rotates from round to round (benchmarks/timing.py); ratios are medians of per-round ratios, so slow phases of the "
    "shared machine hit numerator and denominator alike. Absolute throughputs are medians and move with the load.",
    "- torch runs with 1 thread (`--threads`): with OpenMP threads = cores on a shared machine a parallel region waits "
    "for a descheduled worker.",
    "- Comparisons across E use each model's speed relative to the dense K*ffn model measured in the same rounds, since "
    "that model does not depend on E.",
    "- Decoding: `SequenceGenerator([model], tgt_dict, beam_size=B, min_len=L, max_len_b=L, max_len_a=0)` on `net_input` "
    "with `src_tokens`, `src_lengths`, `src_lang_id`, `tgt_lang_id`; one warm-up run per model and setting.",
    "- The earlier what-if \"cache the task gate's decision for single-task batches\" is now what the model does: the "
    "router takes every per-sentence decision once per forward in the encoder and the decoder reads it from `encoder_out`, "
    "so the full TaskMoE's decoding steps run no gate (its `gate` share above is the router's, once per generate call). "
    "fairseq's per-step module walk (`reorder_incremental_state_scripting`) no longer grows with E: a layer's experts "
    "are one stacked module (docs/benchmarks/stacked-experts.md).",
    "- Dense models are `taskmoe_transformer` with `--encoder-moe-freq 0 --decoder-moe-freq 0` (exactly fairseq's "
    "transformer); `dense (K*ffn in MoE slots)` replaces fc1/fc2 in the MoE positions by width K*ffn (fairseq's own "
    "`build_fc1`/`build_fc2`).",
    "- One CPU has no all-to-all between devices, where most of the paper's token-MoE inference cost came from; expect "
    "smaller gaps than the paper's 1.87x / 2.6x.", "",
]


def markdown(records, command):
    lines = header_lines(records, command)
    lines += ["## Summary (the numbers README.md quotes)", ""] + [f"- {s}" for s in report_bars.summary(records)] + [""]
    bars = report_bars.bars(records)
    if bars:
        lines += ["## Bars", ""] + table(["bar", "measured", "result"], [[b["bar"], b["measured"], "PASS" if b["pass"] else "MISS"] for b in bars]) + [""]
    if "decoding" in records:
        lines += decoding_lines(records)
    if "memory" in records:
        lines += memory_lines(records)
    if "training" in records:
        lines += training_lines(records)
    if "decoding" in records or "training" in records:
        lines += profile_lines(records)
    notes = report_bars.explanations(records)
    if notes:
        lines += ["## Reading the bars", ""] + [n + "\n" for n in notes]
    return "\n".join(lines + METHOD), bars


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", help="JSON files written by the measuring scripts")
    parser.add_argument("--out", default="docs/benchmarks", help="folder for serving_cost.md and serving_cost.png")
    options = parser.parse_args(argv)
    records = load(options.records)
    for kind, render in SINGLE.items():
        if kind in records:
            atomic_write_text(os.path.join(options.out, f"{kind}.md"), render(records.pop(kind)))
            print(f"wrote {os.path.join(options.out, kind + '.md')}")
    if not records:
        return 0
    command = "python benchmarks/report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text, bars = markdown(records, command)
    atomic_write_text(os.path.join(options.out, "serving_cost.md"), text)
    write_plot(records, os.path.join(options.out, "serving_cost.png"))
    for bar in bars:
        print(f"  {'PASS' if bar['pass'] else 'MISS'}  {bar['bar']}: {bar['measured']}")
    print(f"wrote {os.path.join(options.out, 'serving_cost.md')} and serving_cost.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
