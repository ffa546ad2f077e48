"""Peak memory of ``python -m taskmoe_fairseq.extract`` reading expert-parallel shards against
reading the consolidated checkpoint of the same model (issue #10: "report its peak memory
against the consolidated file").

    PYTHONPATH=. python benchmarks/measure_sharded_extraction.py --out docs/benchmarks/sharded_extraction.json

The model: benchmarks/models.py's shape (6+6 layers, d 256, FFN 1024, MoE in every second
layer), target/target routing, E experts (``--experts``, default 32), untrained; written once as
one ordinary checkpoint and as the files of expert-parallel training with P = each of
``--shards`` (:func:`taskmoe_fairseq.expert_parallel.sharded_checkpoint.save_sharded`). Each extraction of en-de
runs in a fresh interpreter; peak = that process's ``VmHWM`` read at exit (``/proc/self/status``).
Memory is not time: a loaded machine gives the same figures. ``report_sharded_extraction.py``
writes the markdown.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models as bench  # noqa: E402  (also puts the repository on sys.path)
import timing  # noqa: E402

# the child: the extract command as `python -m` runs it, its VmHWM printed at exit
CHILD = (
    "import atexit, runpy, sys\n"
    "def peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            print('VmHWM_kB', line.split()[1], file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "sys.argv = ['taskmoe_fairseq.extract', *sys.argv[1:]]\n"
    "runpy.run_module('taskmoe_fairseq.extract', run_name='__main__')\n"
)


def extract_peak(checkpoint: str, output: str) -> dict:
    """Peak resident memory (MiB) and what extract printed, for one extraction of en-de."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", CHILD, "--checkpoint", checkpoint, "--lang-pair", bench.SERVE_PAIR,
                             "--output", output, "--force"], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"extract failed on {checkpoint}:\n{result.stderr[-3000:]}")
    peak_kb = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("VmHWM_kB")]
    shards_line = [line for line in result.stderr.splitlines() if "read expert shards" in line]
    return {"peak_rss_mib": peak_kb[-1] / 1024, "shards_read_line": shards_line[-1] if shards_line else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON record")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--shards", default="8,32", help="comma-separated P values")
    options = parser.parse_args(argv)
    shard_counts = [int(p) for p in options.shards.split(",")]
    import torch

    from taskmoe_fairseq.expert_parallel import sharded_checkpoint

    config = {"shape": bench.SHAPE, "experts": options.experts, "routing": "target/target", "shards": shard_counts,
              "pair": bench.SERVE_PAIR}
    run = timing.Run("sharded_extraction", __file__, argv, threads=1, config=config)
    with tempfile.TemporaryDirectory() as folder:
        dictionary = bench.build_dictionary(bench.SHAPE["vocab"])
        task = bench.fake_task(dictionary)
        args = bench.model_args(bench.SHAPE, "target", "target", experts=options.experts)
        args.arch = "taskmoe_transformer"
        torch.manual_seed(0)
        model = bench.TaskMoeTransformerModel.build_model(args, task)
        state = model.state_dict()
        full = os.path.join(folder, "full.pt")
        sharded_checkpoint.save({"cfg": {"model": args}, "model": state, "optimizer_history": []}, full)
        files = {"consolidated": {"checkpoint": full, "bytes": os.path.getsize(full)}}
        for size in shard_counts:
            stem = os.path.join(folder, f"p{size}", "checkpoint_last")
            os.makedirs(os.path.dirname(stem))
            sharded_checkpoint.save_sharded(state, args, stem, size)
            shard_bytes = [os.path.getsize(sharded_checkpoint.shard_path(stem, s)) for s in range(size)]
            files[f"P={size}"] = {"checkpoint": sharded_checkpoint.shared_path(stem),
                                  "bytes": os.path.getsize(sharded_checkpoint.shared_path(stem)) + sum(shard_bytes),
                                  "shared_bytes": os.path.getsize(sharded_checkpoint.shared_path(stem)),
                                  "shard_bytes": shard_bytes[0]}
        del model, state
        results = {}
        for name, entry in files.items():
            run.log(f"extract {bench.SERVE_PAIR} from {name}")
            measured = extract_peak(entry["checkpoint"], os.path.join(folder, f"{name}.en-de.pt"))
            out_bytes = os.path.getsize(os.path.join(folder, f"{name}.en-de.pt"))
            entry = {k: v for k, v in entry.items() if k != "checkpoint"}
            results[name] = {**entry, **measured, "extracted_bytes": out_bytes}
            run.log(f"  peak {measured['peak_rss_mib']:.0f} MiB; {measured['shards_read_line'] or 'one file'}")
        from taskmoe_fairseq.safe_loading import safe_torch_load

        reference = safe_torch_load(os.path.join(folder, "consolidated.en-de.pt"))["model"]
        for name in results:
            mine = safe_torch_load(os.path.join(folder, f"{name}.en-de.pt"))["model"]
            results[name]["same_as_consolidated"] = mine.keys() == reference.keys() and all(
                torch.equal(mine[key], reference[key]) for key in reference)
    run.record["results"] = results
    run.write(options.out)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
