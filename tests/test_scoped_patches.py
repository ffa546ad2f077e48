"""Importing the plugin changes nothing in fairseq but safe loading (issue 30).

A fresh interpreter (a real process: the test process has long since imported the plugin)
captures every attribute of the fairseq modules and classes the plugin's shims touch, imports
``taskmoe_fairseq``, then runs ``fairseq-train``'s ``main`` in-process without expert
parallelism, and reports which attributes are no longer fairseq's own object after each step.
"""

import json
import os
import subprocess
import sys

from cli_helpers import ENV, REPO, train_command

# (holder, name): the modules and classes whose attributes the plugin's shims replace
HOLDERS = [
    "fairseq.checkpoint_utils",
    "fairseq.distributed.utils",
    "fairseq.models",
    "fairseq.models.distributed_fairseq_model",
    "fairseq.trainer",
    "fairseq.trainer:Trainer",
    "fairseq.optim:FairseqOptimizer",
]

SCRIPT = r"""
import importlib, json, sys, types

holders = json.loads(sys.argv[1])

def holder_of(spec):
    module, _, cls = spec.partition(":")
    found = importlib.import_module(module)
    return getattr(found, cls) if cls else found

def snapshot():
    taken = {}
    for spec in holders:
        for name, value in list(vars(holder_of(spec)).items()):
            if not isinstance(value, types.ModuleType):  # (importing a submodule adds its name)
                taken[f"{spec}.{name}"] = value
    return taken

missing = object()

def changed(before, now):
    return sorted(key for key in set(before) | set(now) if before.get(key, missing) is not now.get(key, missing))

before = snapshot()
import taskmoe_fairseq  # noqa: E402
after_import = changed(before, snapshot())

sys.path.insert(0, "tests")
from cli_helpers import train_in_process  # noqa: E402

train_in_process(json.loads(sys.argv[2]))
after_training = changed(before, snapshot())
with open(sys.argv[3], "w") as out:
    json.dump({"after_import": after_import, "after_training": after_training}, out)
"""

# kept at import, because every path that reads a checkpoint (fairseq-generate, -interactive, the hub,
# training's resume, rank 0's broadcast copy) needs them: torch's safe loader whatever
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says, and one-line refusals (docs/design.md)
SAFE_LOADING = [
    "fairseq.checkpoint_utils.load_checkpoint_to_cpu",
    "fairseq.checkpoint_utils.torch",
    "fairseq.distributed.utils.torch",
]


def test_import_and_a_run_without_expert_parallelism_leave_fairseq_its_own(data_dir, tmp_path):
    save_dir = str(tmp_path / "checkpoints")
    command = train_command(data_dir, save_dir, "token", "token", max_update=2)
    report = str(tmp_path / "report.json")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(HOLDERS), json.dumps(command), report],
        env=ENV, capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(report) as stream:
        changed = json.load(stream)

    # the shims that existed on import before (Trainer.clip_grad_norm, save_checkpoint,
    # checkpoint_suffix, PathManager, FairseqOptimizer.all_reduce_grads, DistributedFairseqModel,
    # broadcast_object, infer_init_method, ...) are fairseq's own after the import
    assert changed["after_import"] == SAFE_LOADING

    # a one-process run of the plugin's task without --moe-expert-parallel-size needs only the resume
    # checks in Trainer.load_checkpoint (a checkpoint of another model, or a folder of expert shards,
    # is refused with one line); no DDP, no expert-parallel trainer or checkpoints
    assert changed["after_training"] == sorted(SAFE_LOADING + ["fairseq.trainer:Trainer.load_checkpoint"])
    assert os.path.isfile(os.path.join(save_dir, "checkpoint_last.pt"))  # the run trained and saved
    applied = [line for line in (result.stdout + result.stderr).splitlines() if "taskmoe_fairseq: resume checks: replaced" in line]
    assert len(applied) == 1 and "fairseq.trainer.Trainer.load_checkpoint" in applied[0], result.stdout[-3000:] + result.stderr[-3000:]
