"""Size and memory: parameters, checkpoint size and peak resident memory of every serving
model (the models of measure_decoding.py) at E = 8, 32, 128.

    PYTHONPATH=. python benchmarks/measure_memory.py --out docs/benchmarks/memory.json [--quick]

Checkpoint size: ``torch.save({"model": state_dict})``. Peak memory: each model in a fresh
interpreter that imports torch + fairseq + the plugin, reads the checkpoint, builds the model
(the extracted ones from their args, as fairseq loads a checkpoint written by
``model.extract``), loads the state strictly, drops it and decodes one batch of 64; peak =
``VmHWM`` of that process (``getrusage().ru_maxrss`` is recorded too, but on Linux it carries
the parent's resident set across fork + exec). No timing is taken here.
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models as bench  # noqa: E402  (also puts the repository on sys.path)
import timing  # noqa: E402
import torch  # noqa: E402
from measure_decoding import Decoder  # noqa: E402

RUN = dict(decode_beam=4, tgt_len=20, parallel=2)
QUICK = dict(decode_beam=1, tgt_len=10)
QUICK_EXPERTS = [32]


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """In a fresh interpreter: load the checkpoint as fairseq does and decode one batch of 64."""
    torch.set_num_threads(spec["threads"])
    shape = spec["shape"]
    dictionary = bench.build_dictionary(shape["vocab"])
    task = bench.fake_task(dictionary)
    gc.collect()
    baseline = proc_status_mb("VmRSS")
    state = torch.load(spec["checkpoint_path"], map_location="cpu", weights_only=True)["model"]
    model = bench.build(spec, shape, task).eval()
    model.load_state_dict(state, strict=True)
    del state
    gc.collect()
    loaded = proc_status_mb("VmRSS")
    Decoder(model, dictionary, spec["decode_beam"], spec["tgt_len"], [bench.decode_inputs(shape, dictionary, 64)]).run()
    return {
        "baseline_rss_mb": baseline,
        "rss_after_load_mb": loaded,
        "rss_after_decode_mb": proc_status_mb("VmRSS"),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "ru_maxrss_mb_inherits_parent": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(command, env):
    """``command`` in a new process: ``(returncode, stdout, stderr)``."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    return done.returncode, done.stdout, done.stderr


def run_children(run, specs, parallel: int, run_command=None):
    """One process per spec, ``parallel`` at a time (memory is per process), each started by
    ``run_command(command, env)`` (default ``run_child``: a fresh interpreter)."""
    start = run_command or run_child
    env = dict(os.environ, PYTHONPATH=bench.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    commands = [[sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)] for spec in specs]
    with ThreadPoolExecutor(parallel) as pool:
        outcomes = list(pool.map(lambda command: start(command, env), commands))
    results = []
    for spec, (returncode, stdout, stderr) in zip(specs, outcomes):
        if returncode != 0:
            raise RuntimeError(f"memory child failed for {spec['key']} E={spec.get('E')}:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
        run.log(f"memory {spec['key']} E={spec.get('E', '-')}: peak {results[-1]['peak_rss_mb']:.0f} MiB")
    return results


def sizes(model, path: str) -> dict:
    torch.save({"model": model.state_dict()}, path)
    return {
        "params": bench.count_params(model),
        "decoder_expert_params": bench.decoder_expert_params(model),
        "decoder_modules": sum(1 for _ in model.decoder.modules()),
        "checkpoint_bytes": os.path.getsize(path),
    }


def main(argv=None, run_command=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_common_args(parser, os.path.join(bench.REPO, "docs", "benchmarks", "memory.json"), "32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        print(json.dumps(child(json.loads(options.child))))
        return 0
    shape, experts = bench.shape_and_experts(options, QUICK_EXPERTS)
    cfg = {**RUN, **(QUICK if options.quick else {}), "experts": experts}
    if options.tiny:
        cfg["tgt_len"] = 4
    run = timing.Run("memory", __file__, argv, options.threads, {"shape": shape, **cfg})
    dictionary = bench.build_dictionary(shape["vocab"])
    task = bench.fake_task(dictionary)
    common = dict(shape=shape, threads=options.threads, decode_beam=cfg["decode_beam"], tgt_len=cfg["tgt_len"])
    with tempfile.TemporaryDirectory(prefix="taskmoe-memory-") as tmpdir:
        dense, pending = {}, []  # the dense children run along with the first E's
        for key in bench.DENSE_KEYS:
            path = os.path.join(tmpdir, f"{key}.pt")
            dense[key] = sizes(bench.build({"key": key}, shape, task), path)
            pending.append(({**common, "key": key, "checkpoint_path": path}, dense[key]))
        run.record["results"]["dense"] = dense
        for count in experts:
            models = bench.serving_models(shape, task, count)
            rows = {}
            for key, model in models.items():
                path = os.path.join(tmpdir, f"{key}-E{count}.pt")
                rows[key] = sizes(model, path)
                pending.append(({**common, "key": key, "E": count, "checkpoint_path": path}, rows[key]))
            del models, model
            gc.collect()  # the children measure alone, without this process holding the models
            specs = [spec for spec, _ in pending]
            for (spec, row), result in zip(pending, run_children(run, specs, cfg["parallel"], run_command)):
                row["memory"] = result
                os.unlink(spec["checkpoint_path"])
            pending = []
            run.record["results"][str(count)] = rows
    run.write(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
