"""Data-parallel ``fairseq-train`` on CPU: ``python -m taskmoe_fairseq.cpu_data_parallel``.

fairseq's own spawning asserts that CUDA devices exist when
``--distributed-world-size > 1``, so this starts the ranks itself, each a
normal ``fairseq-train`` with fairseq's distributed options (gloo backend,
``tcp://`` rendezvous on 127.0.0.1)::

    python -m taskmoe_fairseq.cpu_data_parallel --nprocs 2 -- DATA --user-dir taskmoe_fairseq ... --save-dir ckpt

``--ddp-backend`` chooses fairseq's DDP backend: ``legacy_ddp`` (default; alias
``no_c10d``) all-reduces every gradient in one flat buffer, so experts that a
batch never used need nothing special, and it is the fastest here;
``pytorch_ddp`` (alias ``c10d``, fairseq's own default) is torch's
DistributedDataParallel, for which the plugin turns on
``find_unused_parameters`` (see :mod:`taskmoe_fairseq.compat`). ``torchrun``
works as well (README, "Data-parallel training").

Resuming works as fairseq does it: rank 0 reads the checkpoint with the safe
loader and broadcasts it (or pass ``--load-checkpoint-on-all-dp-ranks``).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_BACKENDS = ("legacy_ddp", "no_c10d", "pytorch_ddp", "c10d")


def rank_command(train_args, nprocs: int, rank: int, port: int, ddp_backend: str = "legacy_ddp"):
    executable = shutil.which("fairseq-train")
    base = [executable] if executable else [sys.executable, "-m", "fairseq_cli.train"]
    return base + list(train_args) + [
        "--cpu",
        "--distributed-world-size", str(nprocs),
        "--distributed-rank", str(rank),
        "--distributed-no-spawn",
        "--device-id", "0",
        "--distributed-backend", "gloo",
        "--distributed-init-method", f"tcp://127.0.0.1:{port}",
        "--ddp-backend", ddp_backend,
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m taskmoe_fairseq.cpu_data_parallel",
        description="Start N CPU ranks of fairseq-train (gloo); the arguments after -- go to fairseq-train.",
    )
    parser.add_argument("--nprocs", type=int, default=2, help="number of ranks (default 2)")
    parser.add_argument("--port", type=int, default=0, help="rendezvous port on 127.0.0.1 (default: a free one)")
    parser.add_argument(
        "--ddp-backend", default="legacy_ddp", choices=DDP_BACKENDS,
        help="fairseq's --ddp-backend for the ranks (default legacy_ddp: the fastest on CPU)",
    )
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the fairseq-train arguments")
    options = parser.parse_args(argv)
    train_args = options.train_args[1:] if options.train_args[:1] == ["--"] else options.train_args
    if not train_args:
        parser.error("give the fairseq-train arguments after --")
    if options.nprocs < 1:
        parser.error("--nprocs must be at least 1")
    port = options.port or free_port()
    # one intra-op thread per rank unless asked otherwise: ranks share the cores
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nprocs)))
    ranks = [subprocess.Popen(rank_command(train_args, options.nprocs, rank, port, options.ddp_backend), env=env) for rank in range(options.nprocs)]
    status = 0
    try:
        while any(process.poll() is None for process in ranks):
            failed = [process for process in ranks if process.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if status else signal.SIGINT)
        for process in ranks:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    status = status or next((process.returncode for process in ranks if process.returncode), 0)
    if status:
        print(f"taskmoe_fairseq.cpu_data_parallel: a rank exited with status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
