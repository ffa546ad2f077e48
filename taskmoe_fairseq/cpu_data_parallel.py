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

The ranks are forked from the launcher after it has imported ``fairseq_cli.train``
(and with it torch and fairseq) once, so N ranks cost one import instead of N
(about 9 s of CPU each on the 2-core machines); each child then runs fairseq-train's
own ``cli_main`` on its argument list, as a fresh ``fairseq-train`` would. Where
``os.fork`` does not exist, or with ``--start-method exec``, each rank is a new
``fairseq-train`` process instead.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_BACKENDS = ("legacy_ddp", "no_c10d", "pytorch_ddp", "c10d")


def rank_args(train_args, nprocs: int, rank: int, port: int, ddp_backend: str = "legacy_ddp"):
    """fairseq-train's arguments for rank ``rank`` of ``nprocs`` (the program not included)."""
    return list(train_args) + [
        "--cpu",
        "--distributed-world-size", str(nprocs),
        "--distributed-rank", str(rank),
        "--distributed-no-spawn",
        "--device-id", "0",
        "--distributed-backend", "gloo",
        "--distributed-init-method", f"tcp://127.0.0.1:{port}",
        "--ddp-backend", ddp_backend,
    ]


def rank_command(train_args, nprocs: int, rank: int, port: int, ddp_backend: str = "legacy_ddp"):
    """The rank as a new process: ``fairseq-train`` (or ``python -m fairseq_cli.train``) and :func:`rank_args`."""
    executable = shutil.which("fairseq-train")
    base = [executable] if executable else [sys.executable, "-m", "fairseq_cli.train"]
    return base + rank_args(train_args, nprocs, rank, port, ddp_backend)


START_METHODS = ("fork", "exec")


def _run_forked_rank(argv) -> None:
    """In a forked child: fairseq-train's ``cli_main`` on ``argv``, then exit with its status (never returns)."""
    status = 1
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from fairseq_cli import train

        sys.argv = ["fairseq-train", *argv]
        train.cli_main()
        status = 0
    except SystemExit as exit:  # argparse's usage errors, a one-line error of the plugin, sys.exit(n)
        if exit.code is None or isinstance(exit.code, int):
            status = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException:  # what an uncaught exception does in a fresh process (the plugin's one-line errors included)
        try:
            sys.excepthook(*sys.exc_info())
        except BaseException:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


class _ForkedRank:
    """A forked rank with the part of ``subprocess.Popen``'s interface the launcher uses
    (``poll``, ``send_signal``, ``kill``, ``wait(timeout)``, ``returncode``)."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum):
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


def start_ranks(train_args, nprocs: int, port: int, ddp_backend: str = "legacy_ddp", start_method: str = "fork"):
    """Start the ``nprocs`` ranks: ``subprocess.Popen`` objects (``exec``) or :class:`_ForkedRank`
    (``fork``). ``OMP_NUM_THREADS`` must be in ``os.environ`` already (torch reads it when imported)."""
    if start_method == "exec" or not hasattr(os, "fork"):
        return [subprocess.Popen(rank_command(train_args, nprocs, rank, port, ddp_backend)) for rank in range(nprocs)]
    import fairseq_cli.train  # noqa: F401  (once, here: every child has it)

    sys.stdout.flush()
    sys.stderr.flush()
    ranks = []
    for rank in range(nprocs):
        pid = os.fork()
        if pid == 0:
            _run_forked_rank(rank_args(train_args, nprocs, rank, port, ddp_backend))
        ranks.append(_ForkedRank(pid))
    return ranks


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``--nprocs``, ``--port``, ``--ddp-backend``, ``--start-method``, then
    ``--`` and the fairseq-train arguments, kept unparsed in ``train_args``)."""
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
    parser.add_argument(
        "--start-method", default="fork", choices=START_METHODS,
        help="fork: the ranks are forked after one import of fairseq (default); exec: each rank is a new fairseq-train process",
    )
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the fairseq-train arguments")
    return parser


def main(argv=None):
    parser = build_parser()
    options = parser.parse_args(argv)
    train_args = options.train_args[1:] if options.train_args[:1] == ["--"] else options.train_args
    if not train_args:
        parser.error("give the fairseq-train arguments after --")
    if options.nprocs < 1:
        parser.error("--nprocs must be at least 1")
    port = options.port or free_port()
    # one intra-op thread per rank unless asked otherwise: ranks share the cores (set before torch is imported)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nprocs)))
    ranks = start_ranks(train_args, options.nprocs, port, options.ddp_backend, options.start_method)
    status = 0
    try:
        while any(rank.poll() is None for rank in ranks):
            failed = [rank for rank in ranks if rank.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.send_signal(signal.SIGTERM if status else signal.SIGINT)
        for rank in ranks:
            try:
                rank.wait(timeout=30)
            except subprocess.TimeoutExpired:
                rank.kill()
                rank.wait()
    status = status or next((rank.returncode for rank in ranks if rank.returncode), 0)
    if status:
        print(f"taskmoe_fairseq.cpu_data_parallel: a rank exited with status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
