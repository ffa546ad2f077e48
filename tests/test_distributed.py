"""Two CPU ranks (gloo) train and resume with every DDP backend fairseq offers for this model,
launched with the plugin's launcher and with torchrun, resuming the way fairseq does by default:
rank 0 reads the checkpoint and broadcasts it (no ``--load-checkpoint-on-all-dp-ranks``)."""

import re
import sys

import pytest

from cli_helpers import python_module, run, train_command
from taskmoe_fairseq.cpu_data_parallel import free_port

FIRST, RESUMED = 3, 6


def fairseq_train_args(data_dir, save_dir, max_update):
    # 8 experts and small batches: some expert of some layer gets no token on some rank in every
    # few updates (what made pytorch_ddp die at update 2)
    command = train_command(data_dir, save_dir, "token", "target", max_update)[1:]  # drop "fairseq-train"
    return command + ["--moe-expert-count", "8", "--max-tokens", "400"]


def launcher(data_dir, save_dir, backend, max_update):
    return python_module(
        "taskmoe_fairseq.cpu_data_parallel", "--nprocs", "2", "--ddp-backend", backend, "--",
        *fairseq_train_args(data_dir, save_dir, max_update),
    )


def torchrun(data_dir, save_dir, backend, max_update):
    """How fairseq users launch: torchrun starts the ranks, fairseq reads its environment (env://)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "fairseq_cli.train", *fairseq_train_args(data_dir, save_dir, max_update),
        "--distributed-backend", "gloo", "--ddp-backend", backend,
    ]


def log_of(result):
    return result.stdout + result.stderr


def last_update(log):
    updates = [int(value) for value in re.findall(r"num_updates[ =](\d+)", log)]
    return max(updates) if updates else None


def assert_two_ranks(log, backend, init_method):
    assert f"distributed init (rank 0): {init_method}" in log
    assert f"distributed init (rank 1): {init_method}" in log
    assert f"'ddp_backend': '{backend}'" in log
    # fairseq's default resume: rank 0 reads the file and broadcasts it
    assert "'load_checkpoint_on_all_dp_ranks': False" in log


def assert_trained_then_resumed(first, resumed, checkpoint_name="checkpoint_last.pt"):
    assert last_update(log_of(first)) == FIRST
    resumed_log = log_of(resumed)
    assert re.search(rf"Loaded checkpoint \S*{checkpoint_name} \(epoch \d+ @ {FIRST} updates\)", resumed_log)
    assert last_update(resumed_log) == RESUMED
    assert "Traceback" not in resumed_log


def test_pytorch_ddp_trains_with_the_launcher_and_resumes_with_torchrun(data_dir, tmp_path):
    """fairseq's default backend: torch's DistributedDataParallel, with find_unused_parameters
    turned on by the plugin (without it training died at update 2: an unused expert had no gradient)."""
    save_dir = str(tmp_path / "ckpt")
    first = run(launcher(data_dir, save_dir, "pytorch_ddp", FIRST))
    resumed = run(torchrun(data_dir, save_dir, "pytorch_ddp", RESUMED))
    assert_two_ranks(log_of(first), "pytorch_ddp", "tcp://127.0.0.1:")
    assert_two_ranks(log_of(resumed), "pytorch_ddp", "env://")
    for result in (first, resumed):
        assert "setting find_unused_parameters=True" in log_of(result)
        assert "training on 2 devices" in log_of(result)
    assert_trained_then_resumed(first, resumed)


@pytest.mark.parametrize("backend", ["no_c10d"])
def test_launcher_backend_trains_and_resumes(backend, data_dir, tmp_path):
    save_dir = str(tmp_path / "ckpt")
    first = run(launcher(data_dir, save_dir, backend, FIRST))
    resumed = run(launcher(data_dir, save_dir, backend, RESUMED))
    for result in (first, resumed):
        assert_two_ranks(log_of(result), backend, "tcp://127.0.0.1:")
        # LegacyDistributedDataParallel all-reduces every gradient: nothing to turn on
        assert "find_unused_parameters=True" not in log_of(result)
    assert_trained_then_resumed(first, resumed)


def test_legacy_ddp_launcher_default_trains_and_resumes(ddp_checkpoint):
    """The launcher's default (legacy_ddp), trained 6 then resumed to 12 updates by the session's
    ``ddp_checkpoint`` fixture (shared with the extraction test), resumed by broadcast."""
    _, (first, resumed) = ddp_checkpoint
    for result in (first, resumed):
        assert_two_ranks(log_of(result), "legacy_ddp", "tcp://127.0.0.1:")
    assert last_update(log_of(first)) == 6
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch \d+ @ 6 updates\)", log_of(resumed))
    assert last_update(log_of(resumed)) == 12


def test_launcher_rejects_an_unknown_ddp_backend(capsys):
    from taskmoe_fairseq import cpu_data_parallel

    with pytest.raises(SystemExit) as stopped:
        cpu_data_parallel.main(["--ddp-backend", "fully_sharded", "--", "data"])
    assert stopped.value.code == 2
    assert "--ddp-backend: invalid choice: 'fully_sharded'" in capsys.readouterr().err
