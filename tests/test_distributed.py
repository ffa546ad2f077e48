"""Data-parallel training on CPU ranks (gloo) with the DDP backends fairseq offers for this model,
launched with the plugin's launcher and with torchrun, resuming the way fairseq does by default:
rank 0 reads the checkpoint and broadcasts it (no ``--load-checkpoint-on-all-dp-ranks``).

Which backend is run at which rank count (``no_c10d`` is fairseq's other name for
``legacy_ddp``: one class, ``LegacyDistributedDataParallel``):

* ``legacy_ddp``: 2 ranks, train and resume (the session's ``ddp_checkpoint``, below); with
  expert parallelism at 2 and 4 ranks (test_expert_parallel_equivalence);
* ``pytorch_ddp``: 4 ranks, train with the launcher, resume with torchrun (below); with expert
  parallelism at 2 ranks (torchrun) and 4 ranks, train and sharded resume (test_expert_parallel_training);
* ``no_c10d``: with expert parallelism at 2 ranks (P = 2) and at 4 ranks (P = 2 on 4 ranks: two
  data-parallel replicas of two expert shards, whose shared parameters go through the backend
  over all 4 ranks), train and sharded resume (test_expert_parallel_training).
"""

import os
import re
import sys

import pytest

from cli_helpers import TASK_ARGS, assert_same_metrics, python_module, run_warm, train_metrics
from rank_runs import assert_ranks, launcher, layout_args, log_of, one_process_curve, torchrun

FIRST, RESUMED = 3, 5


def last_update(log):
    updates = [int(value) for value in re.findall(r"num_updates[ =](\d+)", log)]
    return max(updates) if updates else None


def test_pytorch_ddp_on_four_ranks_trains_with_the_launcher_and_resumes_with_torchrun(data_dir, shared_root, tmp_path):
    """fairseq's default backend (torch's DistributedDataParallel) on 4 ranks, with
    find_unused_parameters turned on by the plugin: without it training dies at update 2
    ("Expected to have finished reduction in the prior iteration": an expert that no token of a
    rank's batch chose has no gradient). The 4 ranks take the global batches one process takes
    with --update-freq 4 (rank_runs), so rank 0's logged metrics, all-reduced over the 4 ranks,
    are those of one process at every update across the resume, to fairseq's 3 logged decimals
    (an expert that no rank used gets no gradient here, as in one process: Adam skips it)."""
    save_dir = str(tmp_path / "ckpt")
    routing = ("token", "target")
    first = run_warm(launcher(4, layout_args(data_dir, save_dir, routing, FIRST, 4), "pytorch_ddp"))
    resumed = run_warm(torchrun(4, layout_args(data_dir, save_dir, routing, RESUMED, 4), "pytorch_ddp"))
    assert_ranks(log_of(first), 4, "pytorch_ddp", "tcp://127.0.0.1:")
    assert_ranks(log_of(resumed), 4, "pytorch_ddp", "env://")
    for result in (first, resumed):
        assert "setting find_unused_parameters=True" in log_of(result)
    assert last_update(log_of(first)) == FIRST
    assert re.search(rf"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ {FIRST} updates\)", log_of(resumed))
    curve = train_metrics(first) + train_metrics(resumed)
    assert [row["num_updates"] for row in curve] == list(range(1, RESUMED + 1))
    assert_same_metrics(curve, one_process_curve(data_dir, shared_root, routing, 20)[:RESUMED])


def test_legacy_ddp_launcher_default_trains_and_resumes(ddp_checkpoint):
    """The launcher's default (legacy_ddp), trained 6 then resumed to 12 updates by the session's
    ``ddp_checkpoint`` fixture (shared with the extraction test), resumed by broadcast."""
    _, (first, resumed) = ddp_checkpoint
    for result in (first, resumed):
        assert_ranks(log_of(result), 2, "legacy_ddp", "tcp://127.0.0.1:")
        # LegacyDistributedDataParallel all-reduces every gradient: nothing to turn on
        assert "find_unused_parameters=True" not in log_of(result)
    assert last_update(log_of(first)) == 6
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch \d+ @ 6 updates\)", log_of(resumed))
    assert last_update(log_of(resumed)) == 12


def test_a_failing_rank_makes_the_launcher_fail(tmp_path):
    """A rank that stops (here: no dictionary in the data folder) ends the launch with its non-zero
    status and one line from the launcher (forked ranks, the default)."""
    args = ["--nprocs", "2", "--", str(tmp_path), *TASK_ARGS, "--arch", "taskmoe_transformer_tiny", "--max-tokens", "100"]
    result = run_warm(python_module("taskmoe_fairseq.cpu_data_parallel", *args), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.rstrip().endswith("taskmoe_fairseq.cpu_data_parallel: a rank exited with status 1")
    assert re.search(r"No such file or directory: \S*dict\.\w+\.txt", result.stderr)


def test_exec_ranks_a_failing_rank_stops_the_others(monkeypatch, capsys, tmp_path):
    """--start-method exec (one new process per rank): rank 1 exits with 3 while rank 0 would run for
    10 minutes; the launcher stops rank 0 (SIGTERM, which rank 0 records) and exits with 3 (an exec
    launch once reported 0)."""
    from taskmoe_fairseq import cpu_data_parallel

    marker, ready = str(tmp_path / "rank0-stopped"), str(tmp_path / "rank0-ready")

    def rank_command(train_args, nprocs, rank, port, ddp_backend):
        if rank == 1:  # fails once rank 0 listens for SIGTERM
            return [sys.executable, "-c", f"import os, sys, time\nwhile not os.path.exists({ready!r}): time.sleep(0.01)\nsys.exit(3)"]
        return [sys.executable, "-c", "import signal, sys, time\n"
                f"signal.signal(signal.SIGTERM, lambda *_: (open({marker!r}, 'w').close(), sys.exit(143)))\n"
                f"open({ready!r}, 'w').close()\ntime.sleep(600)"]

    monkeypatch.setattr(cpu_data_parallel, "rank_command", rank_command)
    assert cpu_data_parallel.main(["--nprocs", "2", "--start-method", "exec", "--", "data"]) == 3
    assert os.path.exists(marker)  # rank 0 was stopped, not waited for
    assert capsys.readouterr().err.strip() == "taskmoe_fairseq.cpu_data_parallel: a rank exited with status 3"


def test_launcher_rejects_an_unknown_ddp_backend(capsys):
    from taskmoe_fairseq import cpu_data_parallel

    with pytest.raises(SystemExit) as stopped:
        cpu_data_parallel.main(["--ddp-backend", "fully_sharded", "--", "data"])
    assert stopped.value.code == 2
    assert "--ddp-backend: invalid choice: 'fully_sharded'" in capsys.readouterr().err


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

    result = run_warm(train_command(data_dir, str(tmp_path / "ckpt"), "target", "target", 1,
                                    ("--ddp-backend", "fully_sharded")), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"taskmoe-fairseq: error: {FSDP_REFUSAL}")
