"""torchrun's ranks forked from the fork server's preloaded state instead of started as new interpreters.

torchrun (``python -m torch.distributed.run``) starts each rank with ``subprocess.Popen([python,
"-u", "-m", "fairseq_cli.train", ...])``: seconds of imports per rank, for every rank of every
torchrun test. In a command the fork server runs (tests/forked_cli.py), the command's process
forks, before torchrun starts, a *zygote*: a copy of it that has torch and fairseq imported and
no thread running. torchrun's ``SubprocessHandler._popen`` is replaced by a request to the
zygote, which forks the rank with torchrun's argv, environment (``RANK``, ``WORLD_SIZE``,
``MASTER_PORT``, ... as torchrun set them), working directory and stdin/stdout/stderr (passed as
file descriptors), in a new session as ``start_new_session`` gives. torchrun keeps everything
else: its rendezvous, its environment for the ranks, watching them and stopping them
(``os.killpg`` on the rank's pid, which is the real process). The rank runs its command as the
fork server's children do (``run_command``). A rank whose import-time environment
(``forked_cli.IMPORT_TIME_ENV``) differs from torchrun's is started by torchrun's own ``Popen``.
"""

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time

from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler


def _zygote(channel, run_command):
    """The zygote's loop: fork a rank per request, report each rank's pid and, later, its exit
    status; exit when torchrun's end of ``channel`` closes. Never returns in the zygote; in a forked
    rank, after it has taken its files, returns ``run_command(argv, env, cwd)``."""
    children = set()
    while True:
        ready, _, _ = select.select([channel], [], [], 0.02 if children else None)
        if ready:
            message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 3)
            if not message:
                os._exit(0)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                channel.close()
                os.setsid()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return run_command(request["argv"], request["env"], request["cwd"])
            for fd in fds:
                os.close(fd)
            children.add(pid)
            channel.sendall((json.dumps({"pid": pid}) + "\n").encode())
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            channel.sendall((json.dumps({"exit": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


class _Rank:
    """The part of ``subprocess.Popen``'s interface torchrun uses, for a rank the zygote forked."""

    def __init__(self, zygote, pid, args):
        self._zygote, self.pid, self.args, self.returncode = zygote, pid, args, None

    def poll(self):
        if self.returncode is None:
            self._zygote.read(0)
            self.returncode = self._zygote.exits.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._zygote.read(0.05 if left is None else min(left, 0.05))
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


class _ZygoteClient:
    """torchrun's end of the channel: requests, and the replies read as they come."""

    def __init__(self, channel):
        self._channel, self._buffer, self._lock = channel, b"", threading.Lock()
        self.pids, self.exits = [], {}

    def read(self, timeout):
        """Every reply that arrives within ``timeout`` seconds (None: wait for one), and any
        others already there."""
        with self._lock:
            while select.select([self._channel], [], [], timeout)[0]:
                chunk = self._channel.recv(65536)
                if not chunk:
                    raise RuntimeError("the zygote that forks torchrun's ranks is gone")
                self._buffer += chunk
                timeout = 0
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                reply = json.loads(line)
                if "pid" in reply:
                    self.pids.append(reply["pid"])
                else:
                    self.exits[reply["exit"]] = reply["returncode"]

    def start(self, argv, env, files):
        with self._lock:
            message = json.dumps({"argv": list(argv), "env": env, "cwd": os.getcwd()}).encode()
            socket.send_fds(self._channel, [message], [file.fileno() if file else fd for fd, file in enumerate(files)])
        while not self.pids:
            self.read(None)
        return _Rank(self, self.pids.pop(0), argv)


def start_zygote(run_command, import_time_env):
    """In the fork server's child that runs torchrun, before torchrun runs: fork the zygote and
    route torchrun's rank starts to it. ``run_command(argv, env, cwd)`` runs a rank's command in
    the forked rank (it returns what the child must run, like the fork server's ``_become``);
    ``import_time_env`` names the variables a rank must share with this process to be forked.
    Returns in the zygote's ranks (with ``run_command``'s result) and in torchrun's process (None)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one request per message
    if os.fork() == 0:
        ours.close()
        return _zygote(theirs, run_command)
    theirs.close()
    client, popen = _ZygoteClient(ours), subprocess_handler.SubprocessHandler._popen
    here = {key: os.environ.get(key) for key in import_time_env}

    def forked_popen(handler, args, env):
        if {key: env.get(key) for key in import_time_env} != here:
            return popen(handler, args, env)
        return client.start(args, env, (None, handler._stdout, handler._stderr))

    subprocess_handler.SubprocessHandler._popen = forked_popen
    return None
