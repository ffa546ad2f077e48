"""Decoding speed of a TaskMoE sub-network exported to CTranslate2, side by side with fairseq.

    PYTHONPATH=. python benchmarks/measure_ct2_export.py --out docs/benchmarks/ct2_export.json [--quick] [--workdir DIR]
    PYTHONPATH=. python benchmarks/report.py docs/benchmarks/ct2_export.json --out docs/benchmarks

Writes one JSON record (benchmarks/timing.py: command, hardware, date, versions; every round's
seconds, the medians, sizes and peak memory); ``report.py`` turns it into ``ct2_export.md``.

Models (untrained weights: ``fairseq-train --max-update 1`` on the bundled en-de text, vocabulary
8000): ``taskmoe_transformer_small`` (3+3 layers, d 256, FFN 1024, 4 heads, E = 8, k = 2,
target/target routing, MoE FFN in the second layer of each side) and its en-de sub-network
extracted with ``--merge-experts`` (FFN 1024 in the dense layers, 2048 in the merged ones), run by

* ``fairseq``: fairseq's ``SequenceGenerator`` through the task's ``inference_step`` (what
  ``fairseq-generate`` runs) on the extracted checkpoint, in this process;
* ``ct2_float32`` / ``ct2_int8``: ``python -m taskmoe_fairseq.export`` of the same checkpoint;
* ``stock_ct2``: CTranslate2 on a stock fairseq ``transformer`` of the nearest shape (3+3, d 256,
  FFN 1368 on every layer: the same FFN width per side in total, so the same FLOPs), converted
  with ``ct2-fairseq-converter``.

Every engine decodes the same batches (fairseq's length-sorted test batches, the same token
strings for CTranslate2) to exactly ``L + 1`` tokens per sentence (the tag, L - 1 pieces, and
fairseq's forced ``</s>``; untrained weights would otherwise stop at random lengths): fairseq
``min_len = max_len_b = L``, CTranslate2 ``min/max_decoding_length = L + 1``. Rounds are
interleaved (engine order rotates); the reported ratio is the median over rounds of each round's
tokens/s ratio. Peak memory: each engine in a fresh subprocess loads its model and decodes one
beam-4 batch of 64 (``VmHWM``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
import timing  # noqa: E402  (standard library only: the memory probes import this module)

ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
PLUGIN = os.path.join(REPO, "taskmoe_fairseq")
BUNDLED = os.path.join(REPO, "examples", "data", "bundled", "libreoffice-6pairs.tar.xz")
TASK = ["--lang-pairs", "en-de,de-en", "--langs", "en,de", "--encoder-langtok", "tgt", "--decoder-langtok"]
SHAPE = ["--encoder-layers", "3", "--decoder-layers", "3", "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
         "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"]
ENGINES = ("fairseq", "ct2_float32", "ct2_int8", "stock_ct2")


def sh(command, **kw):
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=REPO, **kw)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return result


def train_command(data, save_dir, *model):
    return ["fairseq-train", data, *model, "--optimizer", "adam", "--lr", "1e-4", "--max-tokens", "2000", "--max-update", "1",
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-save-optimizer-state", "--cpu", "--seed", "1",
            "--num-workers", "0", "--disable-validation", "--criterion", "label_smoothed_cross_entropy"]


def build(work):
    """Data, the two trained checkpoints, the extracted sub-network and the three CTranslate2 folders."""
    paths = {k: os.path.join(work, k) for k in ("bin", "moe", "stock", "sub.pt", "ct2_float32", "ct2_int8", "stock_ct2")}
    if not os.path.isdir(paths["bin"]):
        with tarfile.open(BUNDLED) as archive:
            archive.extractall(work, filter="data")
        raw = os.path.join(work, "raw")
        os.makedirs(raw, exist_ok=True)
        for name in os.listdir(os.path.join(work, "libreoffice-6pairs", "raw")):
            if ".en-de." in name:
                os.replace(os.path.join(work, "libreoffice-6pairs", "raw", name), os.path.join(raw, name))
        sh([sys.executable, os.path.join(REPO, "examples", "data", "binarize.py"), "--raw", raw, "--out", paths["bin"],
            "--vocab-size", "8000", "--workers", "1"])
    if not os.path.exists(os.path.join(paths["moe"], "checkpoint_last.pt")):
        sh(train_command(paths["bin"], paths["moe"], "--user-dir", PLUGIN, "--task", "multilingual_translation_taskmoe", *TASK,
                         "--arch", "taskmoe_transformer_small", "--encoder-moe-routing", "target", "--decoder-moe-routing", "target"))
    if not os.path.exists(os.path.join(paths["stock"], "checkpoint_last.pt")):
        sh(train_command(paths["bin"], paths["stock"], "--task", "translation_multi_simple_epoch", *TASK, "--arch", "transformer",
                         *SHAPE, "--encoder-ffn-embed-dim", "1368", "--decoder-ffn-embed-dim", "1368"))
    full = os.path.join(paths["moe"], "checkpoint_last.pt")
    if not os.path.exists(paths["sub.pt"]):
        sh([sys.executable, "-m", "taskmoe_fairseq.extract", "--checkpoint", full, "--lang-pair", "en-de",
            "--output", paths["sub.pt"], "--merge-experts"])
    for quantization in ("float32", "int8"):
        if not os.path.isdir(paths[f"ct2_{quantization}"]):
            sh([sys.executable, "-m", "taskmoe_fairseq.export", "--checkpoint", full, "--lang-pair", "en-de", "--format",
                "ctranslate2", "--quantization", quantization, "--output-dir", paths[f"ct2_{quantization}"]])
    if not os.path.isdir(paths["stock_ct2"]):
        sh(["ct2-fairseq-converter", "--model_path", os.path.join(paths["stock"], "checkpoint_last.pt"), "--data_dir",
            paths["bin"], "--user_dir", PLUGIN, "--source_lang", "en", "--target_lang", "de",
            "--output_dir", paths["stock_ct2"]])  # the plugin import allow-lists argparse.Namespace
    return paths


class Fairseq:
    """The extracted checkpoint in fairseq, decoding with the task's ``inference_step``."""

    def __init__(self, checkpoint, data):
        import taskmoe_fairseq  # noqa: F401
        from fairseq import checkpoint_utils

        overrides = {"data": data, "source_lang": "en", "target_lang": "de"}
        models, _, self.task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides=overrides)
        self.models = [m.eval() for m in models]
        self.task.load_dataset("test")

    def batches(self, size, count):
        iterator = self.task.get_batch_iterator(
            dataset=self.task.dataset("test"), max_sentences=size, required_batch_size_multiple=1,
            max_positions=(1024, 1024), ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
        return [batch for batch, _ in zip(iterator, range(count))]

    def tokens(self, batch):
        """CTranslate2 source tokens (tag + pieces, no ``</s>``) of each sentence of ``batch``."""
        symbols = self.task.source_dictionary.symbols
        pad, eos = self.task.source_dictionary.pad(), self.task.source_dictionary.eos()
        return [[symbols[t] for t in row.tolist() if t not in (pad, eos)] for row in batch["net_input"]["src_tokens"]]

    def decode(self, batches, beam, length, threads):
        import torch

        torch.set_num_threads(threads)
        generator = self.task.build_generator(self.models, argparse.Namespace(beam=beam, max_len_a=0, max_len_b=length, min_len=length))
        tokens = 0
        with torch.no_grad():
            for batch in batches:
                for hypotheses in self.task.inference_step(generator, self.models, batch):
                    tokens += len(hypotheses[0]["tokens"])
        return tokens


def ct2_decode(translator, sources, beam, length):
    tokens = 0
    for batch in sources:
        results = translator.translate_batch(batch, target_prefix=[["__de__"]] * len(batch), beam_size=beam,
                                             min_decoding_length=length + 1, max_decoding_length=length + 1)
        tokens += sum(len(r.hypotheses[0]) for r in results)
    return tokens


def measure(config, paths):
    import ctranslate2

    fairseq = Fairseq(paths["sub.pt"], paths["bin"])
    settings = [(beam, size, threads) for beam in (1, 4) for size in (1, 64) for threads in (1, 2)]
    inputs = {size: fairseq.batches(size, config["batches"][size]) for size in (1, 64)}
    strings = {size: [fairseq.tokens(b) for b in batches] for size, batches in inputs.items()}
    translators = {(e, t): ctranslate2.Translator(paths[e], device="cpu", inter_threads=1, intra_threads=t)
                   for e in ENGINES[1:] for t in (1, 2)}
    runs = {f"beam{b}_batch{s}_threads{t}": {e: [] for e in ENGINES} for b, s, t in settings}
    for round_index in range(config["rounds"]):
        for offset, (beam, size, threads) in enumerate(settings):
            order = ENGINES[(round_index + offset) % 4:] + ENGINES[:(round_index + offset) % 4]
            for engine in order:
                start = time.perf_counter()
                if engine == "fairseq":
                    tokens = fairseq.decode(inputs[size], beam, config["length"], threads)
                else:
                    tokens = ct2_decode(translators[(engine, threads)], strings[size], beam, config["length"])
                seconds = time.perf_counter() - start
                runs[f"beam{beam}_batch{size}_threads{threads}"][engine].append({"seconds": seconds, "tokens": tokens})
        print(f"round {round_index + 1}/{config['rounds']} done", flush=True)
    return runs


PROBE = """
import json, resource, sys
sys.path[:0] = [{repo!r}, {repo!r} + "/benchmarks"]
engine, paths, length, batch_file = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rss():  # VmHWM: this process's peak (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
if engine == "fairseq":
    import torch, fairseq, taskmoe_fairseq  # noqa
    torch.set_num_threads(1)
    import measure_ct2_export as bench
    base = rss()
    f = bench.Fairseq(paths["sub.pt"], paths["bin"])
    f.decode(f.batches(64, 1), 4, length, 1)
else:
    import ctranslate2
    import measure_ct2_export as bench
    base = rss()
    with open(batch_file) as stream:
        strings = json.load(stream)
    bench.ct2_decode(ctranslate2.Translator(paths[engine], intra_threads=1), [strings], 4, length)
print(json.dumps({{"peak_mib": rss(), "after_imports_mib": base}}))
"""


def probe(engine, paths, length, batch_file):
    """Peak resident memory (MiB) of a fresh process that loads ``engine``'s model and decodes one
    beam-4 batch of 64, and the same process's peak right after its imports."""
    code = PROBE.format(repo=REPO)
    out = sh([sys.executable, "-c", code, engine, json.dumps(paths), str(length), batch_file]).stdout.strip().splitlines()[-1]
    return json.loads(out)


def size_mib(path):
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def summarize(runs):
    rows = {}
    for key, by_engine in runs.items():
        rate = {e: [r["tokens"] / r["seconds"] for r in by_engine[e]] for e in ENGINES}
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(rate[a], rate[b]))  # noqa: E731
        rows[key] = {
            "tokens_per_s": {e: statistics.median(rate[e]) for e in ENGINES},
            "tokens": {e: by_engine[e][0]["tokens"] for e in ENGINES},
            "ct2_float32_over_fairseq": ratio("ct2_float32", "fairseq"),
            "ct2_int8_over_fairseq": ratio("ct2_int8", "fairseq"),
            "ct2_float32_over_stock_ct2": ratio("ct2_float32", "stock_ct2"),
        }
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks/ct2_export.json", help="the JSON record to write")
    parser.add_argument("--workdir", help="build folder (reused when it exists); default: a new one under /tmp")
    parser.add_argument("--quick", action="store_true", help="one round, few batches, short outputs (checks the script)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios are medians of per-round ratios)")
    options = parser.parse_args(argv)
    config = ({"rounds": 1, "length": 12, "batches": {1: 3, 64: 1}} if options.quick
              else {"rounds": options.rounds, "length": 50, "batches": {1: 8, 64: 1}})
    import taskmoe_fairseq  # noqa: F401  (imports fairseq quietly before the record asks its version)

    run = timing.Run("ct2_export", __file__, argv, threads=1, config=config)
    import ctranslate2

    run.record["environment"]["ctranslate2"] = ctranslate2.__version__
    work = options.workdir or os.path.join("/tmp", f"ct2_export_bench_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    run.log(f"building models in {work} ...")
    paths = build(work)
    runs = measure(config, paths)

    probe_batch = os.path.join(work, "probe_batch.json")
    helper = Fairseq(paths["sub.pt"], paths["bin"])
    with open(probe_batch, "w") as stream:  # scratch input of the memory probes
        json.dump(helper.tokens(helper.batches(64, 1)[0]), stream)
    memory = {engine: probe(engine, paths, config["length"], probe_batch) for engine in ENGINES}
    sizes = {"fairseq": size_mib(paths["sub.pt"]), **{e: size_mib(paths[e]) for e in ENGINES[1:]}}
    run.record["results"] = {"rows": summarize(runs), "runs": runs, "memory": memory, "sizes_mib": sizes}
    run.write(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
