"""Multi-rank ``fairseq-train`` runs for the distributed tests: torchrun starting CPU ranks (real
processes), issue #10's equivalence layout, and runs built once per test run.

The equivalence layout gives 1, 2 and 4 ranks the same global batch: one process with
``--update-freq 4`` takes batches 0-3 for update 1, 4-7 for update 2, ...; 2 ranks with
``--update-freq 2`` and 4 ranks with ``--update-freq 1`` take the same batches (fairseq shards
the batch list round-robin over ranks). Nothing random may differ between the layouts: fairseq
seeds each micro-batch by its index, which differs between them, so dropout is 0 and the token
gate's second expert is taken whole (``all``) instead of sampled.
"""

import os
import sys

from cli_helpers import run, run_in_process, train_metrics, train_command
from conftest import _read_log, _save_log, build_once

GLOBAL_BATCHES = 4  # micro-batches per update, over all ranks
# 500 tokens per micro-batch: 156 batches (39 updates of 4) per epoch of the fixture, so 20 updates stay in epoch 1
LAYOUT = ("--moe-expert-count", "8", "--dropout", "0", "--moe-second-expert-policy", "all",
          "--max-tokens", "500", "--log-interval", "1")


def layout_args(data_dir, save_dir, routing, max_update, ranks, extra=()):
    """fairseq-train's arguments (without the program) for ``ranks`` ranks in the equivalence layout;
    ``routing`` is (encoder routing, decoder routing)."""
    options = LAYOUT + ("--update-freq", str(GLOBAL_BATCHES // ranks)) + tuple(extra)
    return train_command(data_dir, save_dir, *routing, max_update, options)[1:]


def torchrun(nprocs, train_args, ddp_backend="pytorch_ddp"):
    """How fairseq users launch (README, docs/scale-out.md): ``torchrun --standalone
    --nproc_per_node N -m fairseq_cli.train ARGS --distributed-backend gloo --ddp-backend B``
    (``python -m torch.distributed.run`` is torchrun); torchrun starts the ranks as new processes
    on a free local port, fairseq reads its environment (``env://``)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nprocs),
        "-m", "fairseq_cli.train", *train_args, "--distributed-backend", "gloo", "--ddp-backend", ddp_backend,
    ]


def shared_runs(shared_root, name, commands):
    """Run the commands ``commands(folder)`` returns, in turn, once per test run (the pytest-xdist
    workers share the result: conftest's ``build_once``): ``fairseq-train`` in this process,
    torchrun as real processes. Returns the folder and one result per command (``.stdout``, ``.stderr``)."""

    def build(folder):
        for index, command in enumerate(commands(folder)):
            _save_log(folder, str(index), run_in_process(command) if command[0] == "fairseq-train" else run(command))

    folder = build_once(os.path.join(shared_root, name), build)
    count = len([entry for entry in os.listdir(folder) if entry.endswith(".stdout")])
    return folder, [_read_log(folder, str(index)) for index in range(count)]


def one_process_curve(data_dir, shared_root, routing, updates):
    """The logged metrics of one process in the equivalence layout (``train_metrics`` rows),
    ``updates`` updates without saving; the 20-update token/target run is shared by
    test_expert_parallel_equivalence and the 4-rank tests (which compare their first updates)."""
    def commands(folder):
        return [["fairseq-train", *layout_args(data_dir, folder, routing, updates, 1, ("--no-save", "--disable-validation"))]]

    _, (result,) = shared_runs(shared_root, f"one-process-{'-'.join(routing)}-{updates}", commands)
    return train_metrics(result)


def log_of(result):
    return result.stdout + result.stderr


def assert_ranks(log, nprocs, backend, init_method):
    """Every rank joined (``init_method``: ``env://`` from torchrun), under ``backend``, and resuming is fairseq's default: rank 0 reads the checkpoint
    and broadcasts it (the plugin's sharded resume reads every rank's own shard instead)."""
    for rank in range(nprocs):
        assert f"distributed init (rank {rank}): {init_method}" in log, rank
    assert f"'ddp_backend': '{backend}'" in log
    assert "'load_checkpoint_on_all_dp_ranks': False" in log
    # rank 0 logs; its metrics are the all-reduced ones of every rank (compared by the callers)
    assert f"training on {nprocs} devices" in log
    assert "Traceback" not in log
