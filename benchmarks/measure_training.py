"""Training words/s of token/token, token/target, target/target, pair/pair and
static-pair/static-pair MoE models vs the two dense models, at E = 8, 32, 128.

    PYTHONPATH=. python benchmarks/measure_training.py --out docs/benchmarks/training.json [--quick]

One fairseq-style train step: the plugin's criterion (label smoothing + gate loss, read from
``net_output[1]["moe_aux"]``), backward, grads x 1/sample_size, grad norm, fairseq's Adam,
grads set to None. Each MoE model is alternated step by step with the two dense models in
rotating order (benchmarks/timing.py); ratios are medians of per-round ratios, for the whole
step and for forward+backward alone. One profiled step per model says where the time goes.
"""

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models as bench  # noqa: E402  (also puts the repository on sys.path)
import timing  # noqa: E402
import torch  # noqa: E402
from fairseq.optim.adam import Adam as FairseqAdamImpl  # noqa: E402  (what fairseq-train runs on CPU)
from profiling import profiled  # noqa: E402

from taskmoe_fairseq.criterions.moe_label_smoothed_cross_entropy import MoeLabelSmoothedCrossEntropyCriterion  # noqa: E402

ROUTINGS = [("token", "token"), ("token", "target"), ("target", "target"), ("pair", "pair"), ("static-pair", "static-pair")]
REFERENCES = ("dense_kffn", "dense")
RUN = dict(rounds=3, sentences=32, warmup=2)
QUICK = dict(rounds=1, sentences=16, warmup=1)
QUICK_EXPERTS = [32]


class Trainer:
    """fairseq's train step on one device."""

    def __init__(self, model, task):
        self.model = model.train()
        self.criterion = MoeLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = FairseqAdamImpl(self.params, lr=5e-4, betas=(0.9, 0.98), eps=1e-8)

    def step(self, sample):
        """Returns (step seconds, forward+backward seconds)."""
        start = time.perf_counter()
        for p in self.params:
            p.grad = None
        loss, sample_size, _ = self.criterion(self.model, sample)
        loss.backward()
        middle = time.perf_counter()
        grads = [p for p in self.params if p.grad is not None]
        for p in grads:
            p.grad.mul_(1.0 / sample_size)
        torch.nn.utils.clip_grad_norm_(grads, max_norm=float("inf"))  # fairseq always computes the norm
        self.optimizer.step()
        end = time.perf_counter()
        return end - start, middle - start

    def params_with_adam_state(self) -> int:
        return sum(p.numel() for p in self.params if self.optimizer.state.get(p))


def measure_routing(run, cfg, shape, task, experts, enc, dec, dense_trainers, sample) -> dict:
    model = bench.build({"key": "moe", "enc": enc, "dec": dec, "E": experts}, shape, task)
    trainer = Trainer(model, task)
    for _ in range(cfg["warmup"]):  # allocates Adam state for the params that get gradients
        trainer.step(sample)
    runners = {"moe": lambda: trainer.step(sample)}
    runners.update({ref: (lambda t=dense_trainers[ref]: t.step(sample)) for ref in REFERENCES})
    steps = timing.interleaved_rounds(runners, cfg["rounds"])
    total = {key: [s for s, _ in values] for key, values in steps.items()}
    forward_backward = {key: [f for _, f in values] for key, values in steps.items()}
    row = {
        "seconds_per_step": total["moe"],
        "forward_backward_seconds": forward_backward["moe"],
        "update_seconds": [a - b for a, b in zip(total["moe"], forward_backward["moe"])],
        "words_per_s": sample["ntokens"] / timing.median(total["moe"]),
        "params": bench.count_params(model),
        "moe_params": sum(p.numel() for _, moe in model.moe_layers() for p in moe.parameters()),
        "params_with_adam_state": trainer.params_with_adam_state(),
        "profile": profiled(model, shape, lambda: trainer.step(sample), "train.step"),
    }
    for ref in REFERENCES:
        row[f"ratio_vs_{ref}"] = timing.paired_ratio(total["moe"], total[ref])
        row[f"fb_ratio_vs_{ref}"] = timing.paired_ratio(forward_backward["moe"], forward_backward[ref])
        row[f"{ref}_update_seconds_same_rounds"] = [a - b for a, b in zip(total[ref], forward_backward[ref])]
        row[f"{ref}_words_per_s_same_rounds"] = sample["ntokens"] / timing.median(total[ref])
    run.log(f"E={experts} train {enc}/{dec}: {row['words_per_s']:.0f} words/s, x{row['ratio_vs_dense_kffn']:.2f} of dense (K*ffn)")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_common_args(parser, os.path.join(bench.REPO, "docs", "benchmarks", "training.json"), "32")
    options = parser.parse_args(argv)
    shape, experts = bench.shape_and_experts(options, QUICK_EXPERTS)
    cfg = {**RUN, **(QUICK if options.quick else {}), "experts": experts}
    if options.tiny:
        cfg["sentences"] = 8
    run = timing.Run("training", __file__, argv, options.threads, {"shape": shape, **cfg, "routings": [f"{e}/{d}" for e, d in ROUTINGS]})
    dictionary = bench.build_dictionary(shape["vocab"])
    task = bench.fake_task(dictionary)
    sample = bench.training_sample(shape, dictionary, cfg["sentences"])
    run.record["ntokens"] = sample["ntokens"]
    dense_trainers = {key: Trainer(bench.build({"key": key}, shape, task), task) for key in REFERENCES}
    for trainer in dense_trainers.values():
        for _ in range(cfg["warmup"]):
            trainer.step(sample)
    dense_params = {key: bench.count_params(trainer.model) for key, trainer in dense_trainers.items()}
    run.record["dense_params"] = dense_params
    for count in experts:
        rows = {}
        for enc, dec in ROUTINGS:
            rows[f"{enc}/{dec}"] = measure_routing(run, cfg, shape, task, count, enc, dec, dense_trainers, sample)
            gc.collect()
        run.record["results"][str(count)] = rows
    run.record["dense_words_per_s"] = {
        ref: timing.median([row[f"{ref}_words_per_s_same_rounds"] for rows in run.record["results"].values() for row in rows.values()])
        for ref in REFERENCES
    }
    run.write(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
