"""Decoding speed: full token/token MoE, full token/target TaskMoE, its extracted en-de
sub-network (plain and merged) and two dense models, at E = 8, 32, 128, side by side.

    PYTHONPATH=. python benchmarks/measure_decoding.py --out docs/benchmarks/decoding.json [--quick]

Decoding runs through fairseq's own ``SequenceGenerator`` (``min_len = max_len_b = L``,
``max_len_a = 0``: every model emits exactly L tokens + ``</s>`` per sentence), greedy and
beam 4, batch 64 and batch 1. Every round runs every model once per setting in rotating
order (benchmarks/timing.py); ratios are medians of per-round ratios. Also: encoder and
decoder time per sentence, whether the extracted models give the full model's hypotheses,
and (``torch.profiler``) where one greedy-b64 run's time goes.
"""

import argparse
import os
import sys
import time
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models as bench  # noqa: E402  (also puts the repository on sys.path)
import timing  # noqa: E402
import torch  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from profiling import profiled  # noqa: E402

SETTINGS = [("greedy b64", 1, 64), ("beam4 b64", 4, 64), ("greedy b1", 1, 1), ("beam4 b1", 4, 1)]  # (name, beam, batch)
HEADLINE = "greedy b64"
REFERENCES = ("dense", "dense_kffn", "full_token_token", "full_token_target")
PROFILED = ("full_token_token", "full_token_target", "extracted", "dense_kffn")
RUN = dict(tgt_len=20, rounds=3, batch1_sentences=6, profile_every_e=True, profile_runs=2)
QUICK = dict(tgt_len=10, rounds=1, batch1_sentences=3, profile_every_e=False, profile_runs=1)
QUICK_EXPERTS = [8, 32]


class Decoder:
    """One model, one setting: a SequenceGenerator and the batches it decodes."""

    def __init__(self, model, dictionary, beam: int, length: int, batches: List[dict]):
        self.model, self.batches = model, batches
        self.generator = SequenceGenerator([model], dictionary, beam_size=beam, min_len=length, max_len_b=length, max_len_a=0)

    def run(self):
        """Decode every batch; returns (sentences, generated tokens incl. </s>, best hypotheses)."""
        hypotheses = []
        for net_input in self.batches:
            hypotheses.extend(h[0]["tokens"] for h in self.generator.generate([self.model], {"net_input": net_input}))
        return len(hypotheses), sum(len(h) for h in hypotheses), hypotheses


class SplitTimer:
    """Seconds in the encoder and in the decoder during generation: wraps, on the instance,
    ``encoder.forward_torchscript`` and ``decoder.forward`` (what fairseq's ``EnsembleModel``
    calls); the wrappers cost about a microsecond per call, the same for every model."""

    def __init__(self, model):
        self.model, self.setting, self.seconds = model, None, {}
        for part, name in (("encoder", "forward_torchscript"), ("decoder", "forward")):
            module = getattr(model, part)
            original = getattr(module, name)

            def wrapped(*args, _original=original, _part=part, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    if self.setting is not None:
                        key = (self.setting, _part)
                        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

            setattr(module, name, wrapped)

    def remove(self):
        del self.model.encoder.forward_torchscript
        del self.model.decoder.forward


def measure_one_e(run, cfg, shape, dictionary, task, experts, dense_models) -> dict:
    batch64 = bench.decode_inputs(shape, dictionary, 64)
    batches = {64: [batch64], 1: bench.single_sentence_inputs(batch64, dictionary, cfg["batch1_sentences"])}
    models = dict(dense_models)
    models.update(bench.serving_models(shape, task, experts))
    run.log(f"E={experts}: models built")
    decoders = {
        (key, name): Decoder(model, dictionary, beam, cfg["tgt_len"], batches[batch])
        for key, model in models.items() for name, beam, batch in SETTINGS
    }
    timers = {key: SplitTimer(model) for key, model in models.items()}
    warm = {pair: decoder.run() for pair, decoder in decoders.items()}  # warm-up + hypotheses + counts

    def runner(key, name):
        def go():
            timers[key].setting = name
            seconds = timing.timed(decoders[(key, name)].run)
            timers[key].setting = None
            return seconds
        return go

    times = {}
    for name, _, _ in SETTINGS:  # models interleaved within each setting, order rotating per round
        series = timing.interleaved_rounds({key: runner(key, name) for key in models}, cfg["rounds"])
        times.update({(key, name): values for key, values in series.items()})
        run.log(f"E={experts}: {name} done")
    for timer in timers.values():
        timer.remove()

    out = {"models": {}, "profiles": {}}
    for key, model in models.items():
        settings = {}
        for name, beam, batch in SETTINGS:
            sentences, tokens, _ = warm[(key, name)]
            series = times[(key, name)]
            runs = len(series) * sentences
            row = {
                "beam": beam, "batch": batch,
                "seconds_per_round": series, "sentences_per_round": sentences, "tokens_per_round": tokens,
                "sentences_per_s": sentences / timing.median(series), "tokens_per_s": tokens / timing.median(series),
                "encoder_ms_per_sentence": timers[key].seconds.get((name, "encoder"), 0.0) * 1e3 / runs,
                "decoder_ms_per_sentence": timers[key].seconds.get((name, "decoder"), 0.0) * 1e3 / runs,
            }
            for ref in REFERENCES:
                row[f"ratio_vs_{ref}"] = timing.paired_ratio(series, times[(ref, name)])
            settings[name] = row
        identical = None
        if key.startswith("extracted"):
            mine, full = warm[(key, HEADLINE)][2], warm[("full_token_target", HEADLINE)][2]
            identical = sum(bool(torch.equal(a, b)) for a, b in zip(mine, full)) / len(full)
        out["models"][key] = {
            "settings": settings,
            "identical_to_full_token_target": identical,
            "decoder_modules": sum(1 for _ in model.decoder.modules()),
        }
    if cfg["profile_every_e"] or experts == max(cfg["experts"]):
        for key in PROFILED:
            out["profiles"][key] = profiled(models[key], shape, decoders[(key, HEADLINE)].run, "decode.total", cfg["profile_runs"])
        run.log(f"E={experts}: profiles done")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_common_args(parser, os.path.join(bench.REPO, "docs", "benchmarks", "decoding.json"), "8,32")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    options = parser.parse_args(argv)
    shape, experts = bench.shape_and_experts(options, QUICK_EXPERTS)
    cfg = {**RUN, **(QUICK if options.quick else {}), "experts": experts}
    if options.tiny:
        cfg.update(tgt_len=4, batch1_sentences=2)
    if options.rounds:
        cfg["rounds"] = options.rounds
    run = timing.Run("decoding", __file__, argv, options.threads, {"shape": shape, **cfg, "settings": SETTINGS, "serve_pair": bench.SERVE_PAIR})
    dictionary = bench.build_dictionary(shape["vocab"])
    task = bench.fake_task(dictionary)
    dense_models = {key: bench.build({"key": key}, shape, task).eval() for key in bench.DENSE_KEYS}
    for count in experts:
        run.record["results"][str(count)] = measure_one_e(run, cfg, shape, dictionary, task, count, dense_models)
    run.write(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
