#!/usr/bin/env python3
"""The prepared GPU check: what a user with one CUDA GPU runs first (under 8 minutes on one H100).

Every step runs the real command-line tools on the bundled text (unpacked and binarized into
``--workdir``) and records what it saw; nothing is asserted here, the record says it:

1. ``train:<mode>`` -- token/target ``taskmoe_transformer_small`` (the quickstart's recipe), 50
   updates each with ``--fp16``, ``--memory-efficient-fp16``, ``--bf16`` and ``--amp``: every logged
   loss finite, the last below the first;
2. ``extract`` -- the en-de sub-network of the ``--fp16`` model (``python -m taskmoe_fairseq.extract``);
3. ``full=extracted:<dtype>`` -- fairseq-generate (beam 4) on CUDA from the full and the extracted
   checkpoint in fp32, fp16 and bf16: the share of identical hypotheses (1.0 is the guarantee);
4. ``translate:cuda`` / ``serve:cuda`` -- ``python -m taskmoe_fairseq.translate --device cuda`` and
   the server with ``--device cuda``: their translations against fairseq-generate's fp32 ones;
5. ``export:<quantization>`` -- target/target (exportable), 50 ``--fp16`` updates, exported to
   CTranslate2 in float16 and int8_float16 and decoded greedily on CUDA, against fairseq-generate's
   greedy hypotheses of the extracted checkpoint (share identical: quantized, so not exact);
6. ``speed`` -- training words/s of dense, token/target and target/target (same shape, ``--fp16``,
   100 updates each, one after the other), as ratios to dense.

    PYTHONPATH=. python benchmarks/gpu_check.py --out docs/benchmarks/gpu_check.json
    PYTHONPATH=. python benchmarks/report.py docs/benchmarks/gpu_check.json --out docs/benchmarks

``--dry-run`` (any machine) writes the plan: every step with its commands, CUDA steps marked
``skipped: no CUDA`` where there is none; without it, a machine with no CUDA device stops with one
line. The record (kind ``gpu_check``) holds the GPU's name, versions, each step's commands,
status, seconds and findings.
"""

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import quickstart  # noqa: E402  (the recipe, the task options, the bundled data)
import scoring  # noqa: E402
from timing import Run  # noqa: E402

TRAIN_MODES = {"fp16": ["--fp16"], "memory_efficient_fp16": ["--memory-efficient-fp16"], "bf16": ["--bf16"], "amp": ["--amp"]}
GENERATE_DTYPES = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}
QUANTIZATIONS = ("float16", "int8_float16")
SPEED_MODELS = {"dense": ["--encoder-moe-freq", "0", "--decoder-moe-freq", "0"],
                "token/target": [], "target/target": ["--encoder-moe-routing", "target"]}
PAIR = "en-de"  # its 300 test sentences


class Plan:
    """The steps, each run (or, dry, only recorded) in order; a failed step is recorded and the
    rest still run."""

    def __init__(self, workdir, dry, has_cuda, log):
        self.workdir, self.dry, self.has_cuda, self.log = workdir, dry, has_cuda, log
        self.steps = []

    def step(self, name, commands, needs_cuda, read=None, described=()):
        """Record step ``name`` (its ``commands``: lists of arguments); run them unless dry or
        impossible, then ``read(outputs)`` -> findings dict. ``described``: commands that ``read``
        runs itself (a server), recorded only."""
        entry = {"name": name, "commands": [shlex.join(c) for c in list(commands) + list(described)], "needs_cuda": needs_cuda}
        self.steps.append(entry)
        if needs_cuda and not self.has_cuda:
            entry["status"] = "skipped: no CUDA"
            return entry
        if self.dry:
            entry["status"] = "planned"
            return entry
        started, outputs = time.time(), []
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                    env=dict(os.environ, PYTHONWARNINGS="ignore"))
            outputs.append(result.stdout + result.stderr)
            if result.returncode != 0:
                entry.update(status="failed", error=outputs[-1].strip().splitlines()[-1:] or ["(no output)"])
                break
        else:
            entry["status"] = "ok"
            if read is not None:
                try:
                    entry.update(read(outputs))
                except Exception as error:  # a finding that cannot be read is a failed step, not a crash
                    entry.update(status="failed", error=[f"reading the output: {error!r}"])
        entry["seconds"] = round(time.time() - started, 1)
        self.log(f"{name}: {entry['status']}")
        return entry


def train_command(data, save_dir, updates, extra):
    return ["fairseq-train", data, *quickstart.task_args(), *quickstart.RECIPE, *extra,
            "--max-update", str(updates), "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation",
            "--seed", "1", "--log-format", "json", "--log-interval", "10"]


def train_findings(outputs):
    """Losses and words/s of fairseq's ``train_inner`` json lines."""
    inner = [json.loads(line.split("|", 3)[-1]) for line in outputs[-1].splitlines() if "| train_inner |" in line]
    losses = [float(row["loss"]) for row in inner]
    return {"losses": losses, "finite": all(math.isfinite(loss) for loss in losses),
            "falling": len(losses) >= 2 and losses[-1] < losses[0], "words_per_second": [float(r["wps"]) for r in inner]}


def generate_command(data, checkpoint, results, beam, extra=()):
    source, target = PAIR.split("-")
    return ["fairseq-generate", data, *quickstart.task_args(), "--source-lang", source, "--target-lang", target,
            "--path", checkpoint, "--gen-subset", "test", "--beam", str(beam), "--batch-size", "64",
            "--required-batch-size-multiple", "1", "--max-len-a", "0", "--max-len-b", "200",
            *scoring.generate_args(os.path.join(data, "spm.model"), results), *extra]


def same_share(first, second):
    return sum(a == b for a, b in zip(first, second)) / max(1, len(first))


def post_json(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.load(answer)


def serve_command(checkpoint):
    return [sys.executable, "-m", "taskmoe_fairseq.serve", "--checkpoint", checkpoint, "--device", "cuda",
            "--port", "0", "--beam", "4"]


def serve_and_translate(checkpoint, lines):
    """Start the server on CUDA (a free port), translate ``lines`` once, stop it."""
    with subprocess.Popen(serve_command(checkpoint), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO) as server:
        try:
            for line in server.stdout:
                match = re.search(r"on (http://\S+)", line)
                if match:
                    return post_json(match.group(1) + "/translate", {"lang_pair": PAIR, "texts": lines})["translations"]
            raise RuntimeError("the server stopped before listening")
        finally:
            server.terminate()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "gpu_check"))
    parser.add_argument("--out", required=True, help="the JSON record")
    parser.add_argument("--updates", type=int, default=50, help="updates of each precision mode's run")
    parser.add_argument("--speed-updates", type=int, default=100)
    parser.add_argument("--dry-run", action="store_true", help="write the plan, run nothing")
    options = parser.parse_args(argv)

    import torch

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not options.dry_run:
        print("gpu_check: error: no CUDA device here: run it on a GPU machine, or pass --dry-run for the plan",
              file=sys.stderr)
        return 2
    run = Run("gpu_check", __file__, argv, threads=torch.get_num_threads(),
              config={"updates": options.updates, "speed_updates": options.speed_updates, "pair": PAIR,
                      "dry_run": options.dry_run})
    run.record["environment"]["gpu"] = torch.cuda.get_device_name(0) if has_cuda else None
    run.record["environment"]["cuda"] = torch.version.cuda
    work = os.path.abspath(options.workdir)
    data, raw = os.path.join(work, "bin"), os.path.join(work, "libreoffice-6pairs", "raw")
    plan = Plan(work, options.dry_run, has_cuda, run.log)

    if not options.dry_run:
        os.makedirs(work, exist_ok=True)
        with tarfile.open(quickstart.BUNDLED) as archive:
            archive.extractall(work, filter="data")
    plan.step("data", [[sys.executable, os.path.join(REPO, "examples", "data", "binarize.py"), "--raw", raw,
                        "--out", data, "--vocab-size", str(quickstart.VOCAB_SIZE)]], needs_cuda=False)

    for mode, flags in TRAIN_MODES.items():
        plan.step(f"train:{mode}", [train_command(data, os.path.join(work, mode), options.updates, flags)],
                  needs_cuda=True, read=train_findings)
    full = os.path.join(work, "fp16", "checkpoint_last.pt")
    extracted = os.path.join(work, "extracted", f"{PAIR}.pt")
    plan.step("extract", [[sys.executable, "-m", "taskmoe_fairseq.extract", "--checkpoint", full, "--lang-pair", PAIR,
                           "--output", extracted, "--force"]], needs_cuda=True)

    generated = {}
    for dtype, flags in GENERATE_DTYPES.items():
        paths = {name: os.path.join(work, "generate", dtype, name) for name in ("full", "extracted")}

        def same(outputs, paths=paths, dtype=dtype):
            hypotheses = {name: scoring.read_hypotheses(path) for name, path in paths.items()}
            generated[dtype] = hypotheses["extracted"]
            return {"sentences": len(hypotheses["full"]), "identical_share": same_share(hypotheses["full"], hypotheses["extracted"])}

        plan.step(f"full=extracted:{dtype}", [generate_command(data, full, paths["full"], 4, flags),
                                             generate_command(data, extracted, paths["extracted"], 4, flags)],
                  needs_cuda=True, read=same)

    test_source = os.path.join(raw, "test.en-de.en")
    translated = os.path.join(work, "translate.de")

    def translate_findings(outputs):
        with open(translated, encoding="utf-8") as lines:
            ours = [line.rstrip("\n") for line in lines]
        return {"sentences": len(ours), "identical_to_generate_share": same_share(generated.get("fp32", []), ours)}

    plan.step("translate:cuda", [["bash", "-c", f"{sys.executable} -m taskmoe_fairseq.translate --model {extracted} "
                                  f"--lang-pair {PAIR} --beam 4 --max-len-b 200 --device cuda < {test_source} > {translated}"]],
              needs_cuda=True, read=translate_findings)

    def serve_findings(outputs):
        with open(test_source, encoding="utf-8") as lines:
            texts = [next(lines).rstrip("\n") for _ in range(16)]
        answers = serve_and_translate(full, texts)
        return {"texts": len(texts), "identical_to_generate_share": same_share(generated.get("fp32", [])[:16], answers)}

    plan.step("serve:cuda", [], needs_cuda=True, read=serve_findings, described=[serve_command(full)])

    target_model = os.path.join(work, "target-target")
    plan.step("train:target/target", [train_command(data, target_model, options.updates,
                                                    ["--fp16", "--encoder-moe-routing", "target"])], needs_cuda=True,
              read=train_findings)
    target_checkpoint = os.path.join(target_model, "checkpoint_last.pt")
    target_extracted = os.path.join(work, "extracted-target", f"{PAIR}.pt")
    greedy = os.path.join(work, "generate", "greedy")
    plan.step("greedy reference", [
        [sys.executable, "-m", "taskmoe_fairseq.extract", "--checkpoint", target_checkpoint, "--lang-pair", PAIR,
         "--output", target_extracted, "--force"],
        generate_command(data, target_extracted, greedy, 1)], needs_cuda=True)
    for quantization in QUANTIZATIONS:
        folder, out = os.path.join(work, f"ct2-{quantization}"), os.path.join(work, f"ct2-{quantization}.de")

        def export_findings(outputs, out=out):
            with open(out, encoding="utf-8") as lines:
                ours = [line.rstrip("\n") for line in lines]
            return {"identical_to_generate_share": same_share(scoring.read_hypotheses(greedy), ours)}

        plan.step(f"export:{quantization}", [
            [sys.executable, "-m", "taskmoe_fairseq.export", "--checkpoint", target_checkpoint, "--lang-pair", PAIR,
             "--format", "ctranslate2", "--quantization", quantization, "--output-dir", folder, "--force"],
            ["bash", "-c", f"{sys.executable} -m taskmoe_fairseq.translate --model {folder} --lang-pair {PAIR} "
                           f"--beam 1 --max-len-b 200 --device cuda < {test_source} > {out}"]],
            needs_cuda=True, read=export_findings)

    speeds = {}
    for name, flags in SPEED_MODELS.items():
        def speed_findings(outputs, name=name):
            found = train_findings(outputs)
            speeds[name] = sorted(found["words_per_second"][1:])[len(found["words_per_second"][1:]) // 2]
            return {"median_words_per_second": speeds[name],
                    "vs_dense": speeds[name] / speeds["dense"] if "dense" in speeds else None}

        plan.step(f"speed:{name}", [train_command(data, os.path.join(work, "speed-" + name.replace("/", "-")),
                                                  options.speed_updates, ["--fp16", *flags])],
                  needs_cuda=True, read=speed_findings)

    run.record["results"] = {"steps": plan.steps}
    run.write(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
