"""Stacked experts computed together vs the per-expert loop, side by side in one process:
token/token and token/target training words/s, greedy and beam-4 decoding tokens/s, E = 8, 32, 128.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/measure_stacked_experts.py --out docs/benchmarks/stacked-experts.json

Every MoE layer stores its experts stacked (``StackedExperts``); what differs is only how a
token-routed layer computes its dispatched rows (``StackedExperts.compute``):

* ``loop``: one ``F.linear`` pair per used expert on its slice (the computation of the separate
  expert modules the stack replaced);
* ``bmm``: the used experts' rows padded to the largest count and one ``torch.baddbmm`` per FFN
  layer;
* ``auto``: the kept default, chosen per call (``StackedExperts.choose_compute``): on the CPU
  always ``loop``; on a GPU ``bmm`` unless padding dominates.

The same model (same weights) runs in the three forms in rotating order every round
(benchmarks/timing.py); ratios are medians of per-round ratios against ``loop``, of the process's
CPU seconds (``time.process_time``, one torch thread: what the run itself computed, much less
disturbed than wall time by other processes on a shared machine); wall seconds are recorded too. Training is
fairseq's step (measure_training.Trainer: criterion, backward, grad norm, Adam); decoding is
fairseq's SequenceGenerator (measure_decoding.Decoder, every sentence exactly L tokens). Task- and
sentence-routed layers (the token/target decoder) run k experts per sentence group in every form.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models as bench  # noqa: E402  (also puts the repository on sys.path)
import timing  # noqa: E402
import torch  # noqa: E402
from measure_decoding import Decoder  # noqa: E402
from measure_training import Trainer  # noqa: E402

from taskmoe_fairseq.modules.expert_feed_forward import BMM_PADDING_LIMIT, StackedExperts  # noqa: E402

FORMS = ("loop", "bmm", "auto")
ROUTINGS = [("token", "token"), ("token", "target")]
DECODING = [("greedy", 1), ("beam4", 4)]
# 4 + 4 layers (2 MoE layers a side), FFN 512: E = 128 trains in about 2 GB with Adam's state
SHAPE = dict(bench.SHAPE, layers=4, ffn_dim=512)
RUN = dict(rounds=3, sentences=32, warmup=1, decode_batch=16, tgt_len=8)
QUICK = dict(rounds=1, sentences=8, warmup=1, decode_batch=4, tgt_len=4)


def set_compute(model, form: str):
    for module in model.modules():
        if isinstance(module, StackedExperts):
            module.compute = form


def timed(function):
    """``function()`` -> (CPU seconds of this process, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    function()
    return time.process_time() - cpu, time.perf_counter() - wall


def summary(measured: dict, amount: float) -> dict:
    """``measured``: form -> [(cpu, wall) per round]; ``amount``: words or tokens per run."""
    row = {}
    for form in FORMS:
        cpu, wall = [c for c, _ in measured[form]], [w for _, w in measured[form]]
        row[form] = {"cpu_seconds": cpu, "wall_seconds": wall, "per_s": amount / timing.median(cpu),
                     "per_wall_s": amount / timing.median(wall)}
    for form in ("bmm", "auto"):
        row[f"{form}_vs_loop"] = timing.paired_ratio(row[form]["cpu_seconds"], row["loop"]["cpu_seconds"])
        row[f"{form}_vs_loop_wall"] = timing.paired_ratio(row[form]["wall_seconds"], row["loop"]["wall_seconds"])
    return row


def measure_training(cfg, shape, task, experts, enc, dec, sample) -> dict:
    model = bench.build({"key": "moe", "enc": enc, "dec": dec, "E": experts}, shape, task)
    trainer = Trainer(model, task)
    for form in FORMS:  # Adam's state exists before the first timed step, whatever the order
        set_compute(model, form)
        for _ in range(cfg["warmup"]):
            trainer.step(sample)

    def runner(form):
        def run():
            set_compute(model, form)
            return timed(lambda: trainer.step(sample))
        return run

    seconds = timing.interleaved_rounds({form: runner(form) for form in FORMS}, cfg["rounds"])
    return summary(seconds, sample["ntokens"])


def measure_decoding(cfg, shape, task, dictionary, experts, enc, dec) -> dict:
    model = bench.build({"key": "moe", "enc": enc, "dec": dec, "E": experts}, shape, task).eval()
    batch = bench.decode_inputs(shape, dictionary, cfg["decode_batch"])
    rows, hypotheses = {}, {}
    for name, beam in DECODING:
        decoder = Decoder(model, dictionary, beam, cfg["tgt_len"], [batch])
        tokens = {}

        def runner(form):
            def run():
                set_compute(model, form)

                def decode():
                    with torch.no_grad():
                        _, tokens[form], hypotheses[(name, form)] = decoder.run()
                return timed(decode)
            return run

        seconds = timing.interleaved_rounds({form: runner(form) for form in FORMS}, cfg["rounds"])
        rows[name] = summary(seconds, tokens["loop"])
        rows[name]["same_hypotheses"] = all(
            all(torch.equal(a, b) for a, b in zip(hypotheses[(name, form)], hypotheses[(name, "loop")])) for form in FORMS
        )
    return rows


def render(record) -> str:
    """The markdown table of a record: per setting, words or tokens per CPU second of each form,
    speed ratios vs loop (CPU time; wall time in brackets)."""
    lines = ["| E | routing | setting | loop /s | bmm /s | auto /s | bmm / loop | auto / loop |",
             "|---|---|---|---|---|---|---|---|"]
    for experts, by_routing in record["results"].items():
        for routing, settings in by_routing.items():
            for setting, row in settings.items():
                lines.append(
                    f"| {experts} | {routing} | {setting} | {row['loop']['per_s']:.0f} | {row['bmm']['per_s']:.0f} | "
                    f"{row['auto']['per_s']:.0f} | {row['bmm_vs_loop']:.2f} ({row['bmm_vs_loop_wall']:.2f}) | "
                    f"{row['auto_vs_loop']:.2f} ({row['auto_vs_loop_wall']:.2f}) |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_common_args(parser, os.path.join(bench.REPO, "docs", "benchmarks", "stacked-experts.json"), "8,32")
    options = parser.parse_args(argv)
    shape, experts = bench.shape_and_experts(options, [8, 32])
    if not options.tiny:
        shape = dict(SHAPE)
    cfg = {**RUN, **(QUICK if options.quick else {}), "experts": experts, "forms": list(FORMS),
           "bmm_padding_limit": BMM_PADDING_LIMIT}
    run = timing.Run("stacked_experts", __file__, argv, options.threads, {"shape": shape, **cfg})
    dictionary = bench.build_dictionary(shape["vocab"])
    task = bench.fake_task(dictionary)
    sample = bench.training_sample(shape, dictionary, cfg["sentences"])
    run.record["ntokens"] = sample["ntokens"]
    for count in experts:
        rows = {}
        for enc, dec in ROUTINGS:
            routing = f"{enc}/{dec}"
            rows[routing] = {"train": measure_training(cfg, shape, task, count, enc, dec, sample)}
            rows[routing].update(measure_decoding(cfg, shape, task, dictionary, count, enc, dec))
            for setting, row in rows[routing].items():
                run.log(f"E={count} {routing} {setting}: auto x{row['auto_vs_loop']:.2f}, bmm x{row['bmm_vs_loop']:.2f} of loop")
        run.record["results"][str(count)] = rows
    run.write(options.out)
    print(render(run.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
