"""Importing the plugin changes nothing in fairseq but safe loading (issue 30).

A fresh interpreter (a real process: the test process has long since imported the plugin)
captures every attribute of the fairseq modules and classes the plugin's shims touch, imports
``taskmoe_fairseq``, then runs ``fairseq-generate``'s and ``fairseq-train``'s ``main`` in-process
(without expert parallelism), and reports which attributes are no longer fairseq's own object
after each step.
"""

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import ENV, REPO, generate_command, train_command

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
report = {"import": changed(before, snapshot())}

sys.path.insert(0, "tests")
from cli_helpers import run_in_process, train_in_process  # noqa: E402

for command in json.loads(sys.argv[2]):  # in-process fairseq-generate / fairseq-train, in turn
    (train_in_process if command[0] == "fairseq-train" else run_in_process)(command)
    report[command[0]] = changed(before, snapshot())
with open(sys.argv[3], "w") as out:
    json.dump(report, out)
"""

# kept at import, because every path that reads a checkpoint (fairseq-generate, -interactive, the hub,
# training's resume and fine-tuning, rank 0's broadcast copy) needs them: torch's safe loader whatever
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says, one-line refusals, and fairseq's broadcast of a checkpoint
# made plain containers (the safe loader refuses the DictConfig in fairseq's own copy, for any model's
# data-parallel resume) (docs/design.md)
SAFE_LOADING = [
    "fairseq.checkpoint_utils.load_checkpoint_to_cpu",
    "fairseq.checkpoint_utils.torch",
    "fairseq.distributed.utils.broadcast_object",
    "fairseq.distributed.utils.torch",
]


def changed_attributes(tmp_path, commands=(), env=ENV):
    """What a fresh interpreter reports: the fairseq attributes that are not fairseq's own object
    after ``import taskmoe_fairseq`` (``"import"``) and after each in-process command of ``commands``
    (``fairseq-generate``, ``fairseq-train``; keyed by the tool), run in turn."""
    report = str(tmp_path / "report.json")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(HOLDERS), json.dumps(list(commands)), report],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(report) as stream:
        return json.load(stream), result


@pytest.mark.slow
def test_import_and_a_run_without_expert_parallelism_leave_fairseq_its_own(trained, data_dir, tmp_path):
    save_dir = str(tmp_path / "checkpoints")
    generate = generate_command(data_dir, trained.get("token", "target"), "en-de", beam=1)
    train = train_command(data_dir, save_dir, "token", "token", max_update=2)
    changed, result = changed_attributes(tmp_path, [generate, train])

    # what the import replaced before (Trainer.clip_grad_norm, save_checkpoint, load_checkpoint,
    # checkpoint_suffix, checkpoint_utils.PathManager, FairseqOptimizer.all_reduce_grads,
    # DistributedFairseqModel, DistributedDataParallel, infer_init_method, ...) is fairseq's own after it
    assert changed["import"] == SAFE_LOADING
    # generation (the task's model built from a checkpoint) needs nothing more
    assert changed["fairseq-generate"] == SAFE_LOADING

    # a one-process run of the plugin's task without --moe-expert-parallel-size needs only the resume
    # checks in Trainer.load_checkpoint (a checkpoint of another model, or a folder of expert shards,
    # is refused with one line); no DDP, no expert-parallel trainer or checkpoints
    assert changed["fairseq-train"] == sorted(SAFE_LOADING + ["fairseq.trainer:Trainer.load_checkpoint"])
    assert os.path.isfile(os.path.join(save_dir, "checkpoint_last.pt"))  # the run trained and saved
    applied = [line for line in (result.stdout + result.stderr).splitlines() if "taskmoe_fairseq: resume checks: replaced" in line]
    assert len(applied) == 1 and "fairseq.trainer.Trainer.load_checkpoint" in applied[0], result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_the_cpu_torchrun_fix_is_applied_on_import_only_in_a_torchrun_process(tmp_path):
    """fairseq-train infers its world size from torchrun's environment before it builds a task, so
    this fix is applied on import, but only where it can act: a process torchrun started as one of
    several ranks on a machine without CUDA (in a process without torchrun's variables: the test above)."""
    import torch

    torchrun_env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    changed, _ = changed_attributes(tmp_path, env=torchrun_env)
    fix = ["fairseq.distributed.utils._infer_torch_distributed_launch_init", "fairseq.distributed.utils.infer_init_method"]
    assert changed["import"] == sorted(SAFE_LOADING + (fix if torch.cuda.device_count() == 0 else []))
