#!/usr/bin/env python3
"""The paper's Table 1 at small scale: routing granularity vs translation quality.

Kudugunta et al. (2021), Table 1, compares encoder/decoder routings on WMT (30 directions, 32
experts). This script trains, with equal budgets (same number of updates, same batch, same
active parameters per token), each configuration on the real corpus built by
``examples/data/build_corpus.py`` (12 directions, en <-> de fr es ru ja zh),
translates every test set with ``fairseq-generate``, scores it with sacrebleu (BLEU and chrF on
SentencePiece-decoded text) and writes, under ``--out``:

* ``table1.md`` / ``table1.json``: average, xx->en and en->xx BLEU (and chrF) per configuration,
  per-direction scores, the command, configuration, hardware and wall times;
* ``table1_bleu.png``: per-direction bar charts of BLEU and chrF;
* ``routing_heatmap.png``: for each decoder MoE layer of the token/target model, the gate's
  probability of every expert for every target language, and which languages share experts.

"dense" is a TaskMoE with E = k = 2 and static routing: every token uses both experts with
weight 1/2, i.e. a dense FFN of width 2 x FFN, the same active parameters per token as the
top-2 MoE models.

Usage::

    python examples/data/build_corpus.py --out /tmp/corpus      # raw corpus + binarized /tmp/corpus/bin
    python examples/paper_table1.py --data /tmp/corpus/bin --updates 1200 --jobs 2 --out docs/table1
"""

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "examples")]  # this checkout's plugin and example helpers
from data.script_support import atomic_write_bytes  # noqa: E402
import scoring  # noqa: E402  (examples/scoring.py)
from quickstart import PAIRS, XX, generate, run, task_args, test_references  # noqa: E402

# name -> (encoder routing, decoder routing, extra fairseq-train options); the paper's row order
CONFIGS = {
    "dense": ("static-target", "static-target", ["--moe-expert-count", "2"]),
    "static": ("static-target", "static-target", []),
    "token/token": ("token", "token", []),
    "sentence/sentence": ("sentence", "sentence", []),
    "pair/pair": ("pair", "pair", []),
    "target/target": ("target", "target", []),
    "token/pair": ("token", "pair", []),
    "token/target": ("token", "target", []),
}
# the paper's Table 1 (WMT, 32 experts): avg / xx2en / en2xx BLEU
PAPER = {
    "dense": (20.0, 23.7, 17.5), "static": (17.6, 25.0, 10.2), "token/token": (22.6, 24.9, 20.4),
    "sentence/sentence": (19.9, 24.1, 16.8), "pair/pair": (21.4, 25.2, 16.9),
    "target/target": (22.9, 25.6, 20.2), "token/pair": (23.0, 26.2, 20.3), "token/target": (23.6, 26.0, 21.1),
}


def slug(name):
    return name.replace("/", "-")


def say(line):
    """One write per line, so lines of configurations running in threads (--jobs) do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write_json(path, value):
    atomic_write_bytes(path, json.dumps(value, indent=1).encode("utf-8"))


def save_figure(figure, path):
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def thread_env(options):
    """Each of the ``--jobs`` concurrent configurations gets its share of the cores: two 1-thread
    trainings on 2 cores did 1.87 updates/s together vs 1.57 for one 2-thread training."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // options.jobs))}


def train(options, name, save_dir):
    encoder, decoder, extra = CONFIGS[name]
    done = os.path.join(save_dir, "done.json")
    if os.path.exists(done):
        return json.load(open(done))
    started = time.time()
    command = [
        "fairseq-train", options.data, *task_args(),
        "--arch", "taskmoe_transformer_small",
        "--encoder-embed-dim", str(options.dim), "--decoder-embed-dim", str(options.dim),
        "--encoder-ffn-embed-dim", str(4 * options.dim), "--decoder-ffn-embed-dim", str(4 * options.dim),
        "--share-all-embeddings", "--moe-expert-count", str(options.experts), "--moe-top-k", "2",
        "--encoder-moe-routing", encoder, "--decoder-moe-routing", decoder,
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "3e-3",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "200",
        "--max-tokens", str(options.max_tokens), "--dropout", "0.1",
        "--sampling-method", "temperature", "--sampling-temperature", "5",
        "--max-update", str(options.updates), "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--disable-validation",
        "--cpu", "--seed", "1", "--log-format", "simple", "--log-interval", "100", *extra,
    ]
    say(f"  training {name}: --encoder-moe-routing {encoder} --decoder-moe-routing {decoder} {' '.join(extra)}")
    run(command, save_dir + ".log", show=r"train_inner|done training", env=thread_env(options), prefix=f"[{name}] ")
    info = {"train_seconds": time.time() - started, "command": " ".join(command), "jobs": options.jobs}
    write_json(done, info)
    return info


def hypotheses_path(save_dir, pair):
    return os.path.join(save_dir, "hypotheses", f"test.{pair}.txt")


def read_hypotheses(save_dir):
    """Detokenised test hypotheses per direction, or None when any is missing."""
    paths = {pair: hypotheses_path(save_dir, pair) for pair in PAIRS}
    if not all(os.path.exists(path) for path in paths.values()):
        return None
    return {pair: open(path, encoding="utf-8").read().split("\n")[:-1] for pair, path in paths.items()}


def evaluate(options, name, save_dir):
    """Translate every test set with fairseq-generate (its own results file under
    ``save_dir/generate/<pair>``); keep the detokenised hypotheses (``hypotheses/test.<pair>.txt``,
    for the bootstrap) and return sacrebleu's BLEU and chrF with their signatures."""
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    scores = {}
    for pair in PAIRS:
        outputs, _ = generate(options.data, checkpoint, pair, os.path.join(save_dir, "generate", pair),
                              beam=options.beam, batch_size=128, env=thread_env(options))
        references = test_references(options.data, pair)
        atomic_write_bytes(hypotheses_path(save_dir, pair), "".join(line + "\n" for line in outputs).encode("utf-8"))
        scores[pair] = scoring.score(outputs, references, pair.split("-")[1])
        say(f"    {name} {pair}: BLEU {scores[pair]['bleu']:.1f} chrF {scores[pair]['chrf']:.1f}")
    return scores


def bootstrap(options, hypotheses, samples=1000):
    """Paired bootstrap resampling (Koehn 2004; sacrebleu's ``--paired-bs`` statistics) of the
    average BLEU. The test sets are multi-way (sentence i has the same English in all 12
    directions), so one resample of the 500 sentence indices is shared by every direction and
    every configuration. Returns, per configuration, ``[samples]`` arrays of the average, xx->en
    and en->xx BLEU."""
    import numpy as np

    references = {pair: test_references(options.data, pair) for pair in PAIRS}
    size = len(references[PAIRS[0]])
    resamples = np.random.default_rng(1).integers(0, size, size=(samples, size))
    result = {}
    for name, outputs in hypotheses.items():
        per_direction = {}
        for pair in PAIRS:
            metric = scoring.bleu_metric(pair.split("-")[1])
            stats = scoring.sentence_statistics(metric, outputs[pair], references[pair])  # [size, 2 + 2n]
            per_direction[pair] = scoring.resampled_scores(metric, stats, resamples)
        result[name] = {
            "avg": np.mean([per_direction[pair] for pair in PAIRS], axis=0),
            "xx_en": np.mean([per_direction[f"{xx}-en"] for xx in XX], axis=0),
            "en_xx": np.mean([per_direction[f"en-{xx}"] for xx in XX], axis=0),
        }
    return result


def interval(values):
    import numpy as np

    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def parameter_counts(checkpoint):
    """Total parameters, and parameters one token uses (k of the E experts of each MoE layer)."""
    from taskmoe_fairseq.models.checkpoint_config import saved_options
    from taskmoe_fairseq.safe_loading import safe_torch_load

    state = safe_torch_load(checkpoint)
    args = saved_options(state)[0]
    total = sum(value.numel() for value in state["model"].values())
    experts = sum(value.numel() for key, value in state["model"].items() if ".moe.experts." in key)
    unused = experts * (args.moe_expert_count - args.moe_top_k) / args.moe_expert_count
    return total, int(total - unused)


def averages(scores, metric):
    def mean(values):
        return sum(values) / len(values)

    xx_en = mean([scores[f"{xx}-en"][metric] for xx in XX])
    en_xx = mean([scores[f"en-{xx}"][metric] for xx in XX])
    return mean([s[metric] for s in scores.values()]), xx_en, en_xx


def routing_heatmap(checkpoint, path):
    """Gate probabilities of every expert for every target language, per decoder MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from taskmoe_fairseq.models.checkpoint_config import saved_options
    from taskmoe_fairseq.safe_loading import safe_torch_load

    state = safe_torch_load(checkpoint)
    args, model = saved_options(state)[0], state["model"]
    langs = list(args.taskmoe_langs)
    # the decoder's task gates live in the router: encoder.moe_router.gates.decoder_<layer>.task_logits
    # (checkpoints from before the router: decoder.layers.<layer>.moe.gate.task_logits)
    layers = sorted(
        (key for key in model if key.endswith("task_logits") and ("gates.decoder_" in key or key.startswith("decoder."))),
        key=lambda key: int(key.split("decoder_")[1].split(".")[0]) if "gates.decoder_" in key else int(key.split(".")[2]),
    )
    if not layers:
        sys.exit(f"paper_table1: {checkpoint} has no task-routed decoder MoE layer to draw")
    figure, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 3.2), squeeze=False)
    sharing = []
    for axis, key in zip(axes[0], layers):
        probs = model[key].float().softmax(-1)  # [languages, experts]
        top = probs.topk(args.moe_top_k, dim=-1).indices
        image = axis.imshow(probs.numpy(), cmap="viridis", aspect="auto", vmin=0)
        figure.colorbar(image, ax=axis, label="gate probability")
        axis.set_yticks(range(len(langs)), [f"->{lang}" for lang in langs])
        axis.set_xticks(range(probs.size(1)))
        axis.set_xlabel("expert")
        layer = key.split("decoder_")[1].split(".")[0] if "gates.decoder_" in key else key.split(".")[2]
        axis.set_title(f"decoder layer {layer} (0-based): target language -> expert")
        shared = {}
        for expert in range(probs.size(1)):
            users = [lang for lang, experts in zip(langs, top.tolist()) if expert in experts]
            if len(users) > 1:
                shared[expert] = users
        sharing.append({"layer": f"decoder.{layer}", "experts_of": dict(zip(langs, top.tolist())), "shared_experts": shared})
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return sharing


def bar_chart(results, path):
    """Per-direction BLEU (top) and chrF (bottom), one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    width = 0.8 / len(names)
    for axis, metric, label in zip(axes, ("bleu", "chrf"), ("BLEU", "chrF")):
        for index, name in enumerate(names):
            values = [results[name]["scores"][pair][metric] for pair in PAIRS]
            axis.bar([p + index * width for p in range(len(PAIRS))], values, width, label=name)
        axis.set_ylabel(f"{label} (sacrebleu)")
        axis.set_title(f"Per-direction {label} by encoder/decoder routing")
    axes[1].set_xticks([p + 0.4 - width / 2 for p in range(len(PAIRS))], PAIRS)
    axes[0].legend(ncol=4, fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def hardware():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="binarized corpus from examples/data/binarize.py")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "table1"))
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "table1"))
    parser.add_argument("--updates", type=int, default=1200, help="updates per configuration (equal budget)")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128, help="d_model (FFN 4x)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="subset, comma-separated")
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations trained at once, each with cores/jobs threads (2 is faster on 2 cores)")
    options = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (the figures; checked before hours of training)
    except ImportError:
        sys.exit("paper_table1: matplotlib is missing; install it with pip install -e '.[bench]'")

    if not os.path.exists(os.path.join(options.data, "spm.model")):
        sys.exit(f"paper_table1: {options.data} has no spm.model; build it with examples/data/binarize.py")
    names = options.configs.split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        sys.exit(f"paper_table1: unknown configuration {','.join(unknown)}; choose from {','.join(CONFIGS)}")
    os.makedirs(options.out, exist_ok=True)
    os.makedirs(options.workdir, exist_ok=True)
    started = time.time()

    def train_and_score(name):
        save_dir = os.path.join(options.workdir, slug(name))
        info = train(options, name, save_dir)
        scores_path = os.path.join(save_dir, "scores.json")
        if os.path.exists(scores_path) and read_hypotheses(save_dir) is not None:
            scores = json.load(open(scores_path))
        else:
            scores = evaluate(options, name, save_dir)
            write_json(scores_path, scores)
        total, active = parameter_counts(os.path.join(save_dir, "checkpoint_last.pt"))
        return {"train_seconds": info["train_seconds"], "jobs": info.get("jobs", 1), "command": info["command"],
                "parameters": total, "active_parameters_per_token": active, "scores": scores}

    with ThreadPoolExecutor(max_workers=options.jobs) as pool:  # the work is in the fairseq subprocesses
        results = dict(zip(names, pool.map(train_and_score, names)))

    resampled = bootstrap(options, {name: read_hypotheses(os.path.join(options.workdir, slug(name))) for name in names})
    baseline = "dense" if "dense" in names else names[0]
    lines = [
        f"| encoder / decoder routing | BLEU avg [95% CI] | xx→en | en→xx | chrF avg / xx→en / en→xx "
        f"| Δ BLEU avg vs {baseline} [95% CI] | parameters: total / per token | paper BLEU avg / xx→en / en→xx | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        avg, xx_en, en_xx = averages(result["scores"], "bleu")
        chrf = averages(result["scores"], "chrf")
        difference = resampled[name]["avg"] - resampled[baseline]["avg"]
        result.update(bleu_avg=avg, bleu_xx_en=xx_en, bleu_en_xx=en_xx, bleu_avg_ci95=interval(resampled[name]["avg"]),
                      bleu_xx_en_ci95=interval(resampled[name]["xx_en"]), bleu_en_xx_ci95=interval(resampled[name]["en_xx"]),
                      chrf_avg=chrf[0], chrf_xx_en=chrf[1], chrf_en_xx=chrf[2],
                      bleu_avg_minus_baseline=avg - averages(results[baseline]["scores"], "bleu")[0],
                      bleu_avg_minus_baseline_ci95=interval(difference))
        low, high = result["bleu_avg_ci95"]
        delta = "—" if name == baseline else (
            f"{result['bleu_avg_minus_baseline']:+.2f} [{result['bleu_avg_minus_baseline_ci95'][0]:+.2f}, "
            f"{result['bleu_avg_minus_baseline_ci95'][1]:+.2f}]")
        paper = " / ".join(f"{v:.1f}" for v in PAPER[name])
        lines.append(
            f"| {name} | {avg:.2f} [{low:.2f}, {high:.2f}] | {xx_en:.2f} | {en_xx:.2f} | "
            f"{chrf[0]:.1f} / {chrf[1]:.1f} / {chrf[2]:.1f} | {delta} | "
            f"{result['parameters'] / 1e6:.2f}M / {result['active_parameters_per_token'] / 1e6:.2f}M | {paper} | "
            f"{result['train_seconds'] / 60:.0f} min |")
    per_direction = []
    for metric in ("bleu", "chrf"):
        per_direction += ["", f"### {metric.upper() if metric == 'bleu' else 'chrF'}", "",
                          "| routing | " + " | ".join(PAIRS) + " |", "|---|" + "---|" * len(PAIRS)]
        for name, result in results.items():
            per_direction.append(f"| {name} | " + " | ".join(f"{result['scores'][p][metric]:.1f}" for p in PAIRS) + " |")
    bar_chart(results, os.path.join(options.out, "table1_bleu.png"))
    sharing = None
    if "token/target" in results:
        sharing = routing_heatmap(os.path.join(options.workdir, "token-target", "checkpoint_last.pt"),
                                  os.path.join(options.out, "routing_heatmap.png"))
    command = "python examples/paper_table1.py " + " ".join(argv if argv is not None else sys.argv[1:])
    elapsed = time.time() - started
    report = [
        "# The paper's Table 1 at small scale",
        "",
        f"Command: `{command}`  ",
        f"Data: {options.data} (12 directions, en <-> {', '.join(XX)}); configuration: taskmoe_transformer_small "
        f"with d_model {options.dim}, FFN {4 * options.dim}, 3+3 layers, MoE in layer 2 of each side, "
        f"E = {options.experts}, k = 2, {options.updates} updates of {options.max_tokens} tokens, "
        f"temperature sampling T = 5, greedy decoding (beam {options.beam}).  ",
        f"Hardware: {hardware()}; {options.jobs} configuration(s) trained at once with "
        f"{thread_env(options)['OMP_NUM_THREADS']} thread(s) each, so 'train time' is the wall time of one configuration "
        f"sharing the machine (all trainings: {sum(r['train_seconds'] for r in results.values()) / 60:.0f} min, "
        f"divided by {options.jobs} running at once); this invocation took {elapsed / 60:.0f} min "
        "(configurations already trained or scored are reused).  ",
        "BLEU and chrF: sacrebleu on SentencePiece-decoded output (fairseq-generate's own results files), signatures below. "
        "95% intervals: paired bootstrap over the 500 multi-way test sentences (1,000 resamples shared by all "
        "directions and configurations). Parameters per token: the MoE layers count k of their E experts.",
        "",
        *lines,
        "",
        "sacrebleu signatures:",
        "",
        *("* " + line for line in scoring.signature_lines(pair.split("-")[1] for pair in PAIRS)),
        "",
        "## Per direction",
        *per_direction,
        "",
        "![per-direction BLEU and chrF](table1_bleu.png)",
    ]
    if sharing:
        report += ["", "## Which target languages share decoder experts (token/target)", "",
                   "![routing heatmap](routing_heatmap.png)", ""]
        for layer in sharing:
            experts = ", ".join(f"{lang}: {sorted(e)}" for lang, e in layer["experts_of"].items())
            shared = "; ".join(f"expert {e}: {', '.join(users)}" for e, users in layer["shared_experts"].items()) or "none"
            report.append(f"* {layer['layer']}: top-2 experts per target language — {experts}. Shared: {shared}.")
    atomic_write_bytes(os.path.join(options.out, "table1.md"), ("\n".join(report) + "\n").encode("utf-8"))
    write_json(os.path.join(options.out, "table1.json"),
               {"command": command, "hardware": hardware(),
                "signatures": scoring.signatures(pair.split("-")[1] for pair in PAIRS), "wall_seconds": elapsed, "options": vars(options),
                "results": results, "routing_sharing": sharing, "paper": PAPER})
    print("\n".join(lines))
    print("\n".join(scoring.signature_lines(pair.split("-")[1] for pair in PAIRS)))
    for layer in sharing or []:
        print(f"{layer['layer']} (token/target), experts shared by target languages: "
              + ("; ".join(f"{e}: {', '.join(users)}" for e, users in layer["shared_experts"].items()) or "none"))
    print(f"wrote {options.out}/table1.md, table1.json, table1_bleu.png" + (", routing_heatmap.png" if sharing else ""))


if __name__ == "__main__":
    main()
