"""Data-parallel training on CPU ranks (gloo) with the DDP backends fairseq offers for this model,
launched with torchrun (real processes), resuming the way fairseq does by default: rank 0 reads
the checkpoint and broadcasts it (no ``--load-checkpoint-on-all-dp-ranks``).

Which backend is run at which rank count (``no_c10d`` is fairseq's other name for
``legacy_ddp``: one class, ``LegacyDistributedDataParallel``):

* ``legacy_ddp``: 2 ranks, train and resume (the session's ``ddp_checkpoint``, below); with
  expert parallelism at 2 and 4 ranks (test_expert_parallel_equivalence);
* ``pytorch_ddp``: 4 ranks, train and resume (below); with expert parallelism at 2 ranks and 4
  ranks, train and sharded resume (test_expert_parallel_training);
* ``no_c10d``: with expert parallelism at 2 ranks (P = 2) and at 4 ranks (P = 2 on 4 ranks: two
  data-parallel replicas of two expert shards, whose shared parameters go through the backend
  over all 4 ranks), train and sharded resume (test_expert_parallel_training).
"""

import os
import re
import sys

import pytest

from cli_helpers import TASK_ARGS, assert_same_metrics, run, run_in_process, train_metrics
from rank_runs import assert_ranks, layout_args, log_of, one_process_curve, torchrun

FIRST, RESUMED = 3, 5


def last_update(log):
    updates = [int(value) for value in re.findall(r"num_updates[ =](\d+)", log)]
    return max(updates) if updates else None


@pytest.mark.slow
def test_pytorch_ddp_on_four_ranks_trains_and_resumes(data_dir, shared_root, tmp_path):
    """fairseq's default backend (torch's DistributedDataParallel) on 4 ranks, with
    find_unused_parameters turned on by the plugin: without it training dies at update 2
    ("Expected to have finished reduction in the prior iteration": an expert that no token of a
    rank's batch chose has no gradient). The 4 ranks take the global batches one process takes
    with --update-freq 4 (rank_runs), so rank 0's logged metrics, all-reduced over the 4 ranks,
    are those of one process at every update across the resume, to fairseq's 3 logged decimals
    (an expert that no rank used gets no gradient here, as in one process: Adam skips it)."""
    save_dir = str(tmp_path / "ckpt")
    routing = ("token", "target")
    first = run(torchrun(4, layout_args(data_dir, save_dir, routing, FIRST, 4), "pytorch_ddp"))
    resumed = run(torchrun(4, layout_args(data_dir, save_dir, routing, RESUMED, 4), "pytorch_ddp"))
    assert_ranks(log_of(first), 4, "pytorch_ddp", "env://")
    assert_ranks(log_of(resumed), 4, "pytorch_ddp", "env://")
    for result in (first, resumed):
        assert "setting find_unused_parameters=True" in log_of(result)
    assert last_update(log_of(first)) == FIRST
    assert re.search(rf"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ {FIRST} updates\)", log_of(resumed))
    curve = train_metrics(first) + train_metrics(resumed)
    assert [row["num_updates"] for row in curve] == list(range(1, RESUMED + 1))
    assert_same_metrics(curve, one_process_curve(data_dir, shared_root, routing, 20)[:RESUMED])


@pytest.mark.slow
def test_legacy_ddp_trains_and_resumes(ddp_checkpoint):
    """legacy_ddp, trained 6 then resumed to 12 updates by the session's ``ddp_checkpoint``
    fixture (shared with the extraction test), resumed by broadcast."""
    _, (first, resumed) = ddp_checkpoint
    for result in (first, resumed):
        assert_ranks(log_of(result), 2, "legacy_ddp", "env://")
        # LegacyDistributedDataParallel all-reduces every gradient: nothing to turn on
        assert "find_unused_parameters=True" not in log_of(result)
    assert last_update(log_of(first)) == 6
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch \d+ @ 6 updates\)", log_of(resumed))
    assert last_update(log_of(resumed)) == 12


@pytest.mark.slow
def test_a_failing_rank_makes_torchrun_fail(tmp_path):
    """A rank that stops (here: no dictionary in the data folder) ends the launch with a non-zero
    status; torchrun names the failed rank, and the rank's own error is in the output."""
    args = [str(tmp_path), *TASK_ARGS, "--arch", "taskmoe_transformer_tiny", "--max-tokens", "100", "--cpu"]
    result = run(torchrun(2, args, "legacy_ddp"), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ChildFailedError" in result.stderr and re.search(r"rank\s*: [01] \(local_rank: [01]\)", result.stderr)
    assert re.search(r"No such file or directory: \S*dict\.\w+\.txt", result.stderr)


FSDP_REFUSAL = "--ddp-backend fully_sharded is not supported by taskmoe_transformer"


@pytest.mark.parametrize("precision", [(), ("--fp16",), ("--fp16", "--memory-efficient-fp16")], ids=["fp32", "fp16", "mefp16"])
def test_fully_sharded_is_refused_before_fsdp_is_built(data_dir, tmp_path, precision):
    """FSDP flattens the gates into its (half-precision) parameter buffer: fairseq-train's
    ``main`` stops with one line when the task builds the model, before fairseq builds FSDP
    (which on this CPU stops with a traceback: "Torch not compiled with CUDA enabled", or
    fairscale's "torch.distributed is not yet initialized") and before anything is written to
    --save-dir."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    from cli_helpers import train_command
    from taskmoe_fairseq.errors import TaskMoeError

    save_dir = tmp_path / "ckpt"
    command = train_command(data_dir, str(save_dir), "token", "target", 1, ("--ddp-backend", "fully_sharded", *precision))
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), command[1:]))
    with pytest.raises(TaskMoeError) as refused:
        train.main(cfg)
    assert str(refused.value).startswith(FSDP_REFUSAL) and "\n" not in str(refused.value)
    assert not save_dir.exists() or os.listdir(save_dir) == []


def test_fully_sharded_refusal_is_one_line_from_the_command(data_dir, tmp_path):
    from cli_helpers import train_command

    result = run_in_process(train_command(data_dir, str(tmp_path / "ckpt"), "target", "target", 1,
                                    ("--ddp-backend", "fully_sharded")), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"taskmoe-fairseq: error: {FSDP_REFUSAL}")
