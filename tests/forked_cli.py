"""Real command-line processes without a fresh interpreter's imports: a fork server.

Every ``fairseq-*`` command and ``python -m taskmoe_fairseq...`` starts by importing torch and
fairseq, seconds of CPU per process. The server is one interpreter that imports, once, what
fairseq imports (torch, scipy, sklearn, hydra ...) and fairseq itself, but not the plugin or a
``fairseq_cli`` module, and leaves logging unconfigured (what fairseq's import does to logging is
replayed in each child where its command imports fairseq: ``_import_fairseq``);
for each command it forks a child that takes the command's stdin/stdout/stderr files, argv,
environment and working directory and runs the command's own entry point as the interpreter
would (a console script's ``cli_main``, ``runpy`` for ``-m`` and scripts). The child is a real
process: its exit status, its stderr (what ``sys.excepthook`` prints, one-line errors included)
and its files are the command's own. What differs from a fresh interpreter is only what was
imported before the command began, so the tests that check what importing prints or how a
command behaves from a cold start keep a fresh process (``cli_helpers.run``).

Protocol (one JSON object per line, over two pipes): ``{"id", "argv", "env", "cwd", "stdin",
"stdout", "stderr"}`` (file paths) starts a command, ``{"kill": id}`` kills its process group;
the server answers ``{"id", "returncode"}`` when a child ends. Several commands may run at once.
"""

import atexit
import builtins
import gc
import importlib
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

# import-time environment: the server only serves commands whose environment agrees on these
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "PYTHONWARNINGS", "PYTHONHASHSEED")


FAIRSEQ = ("fairseq", "fairseq.checkpoint_utils", "fairseq.options", "fairseq.sequence_generator", "fairseq.trainer")
# imported by the commands later than fairseq's import: torch.optim's first optimizer imports
# torch._dynamo (and sympy with it, ~800 modules, over a second per fairseq-train); hydra loads
# its core plugins when fairseq composes the config; torchrun's launcher
LATER = ("torch._dynamo", "hydra._internal.core_plugins.basic_launcher", "hydra._internal.core_plugins.basic_sweeper",
         "hydra._internal.core_plugins.structured_config_source", "torch.distributed.run")
OWN_MODULES = ("fairseq", "fairseq_cli", "taskmoe_fairseq")


def _preload():
    """Every module that importing fairseq imports (torch, scipy, sklearn, hydra, ...), then fairseq's
    own (``_import_fairseq``), but not the plugin or a ``fairseq_cli`` module: those configure
    logging when imported, each in its own way. The dependencies' names come from a forked probe
    that imports fairseq; they are imported here in the order the probe first met them. Returns
    what fairseq's import did to logging (``_import_fairseq``)."""
    read, write = os.pipe()
    probe = os.fork()
    if probe == 0:
        os.close(read)
        for name in FAIRSEQ + LATER:
            importlib.import_module(name)
        names = [name for name in sys.modules if name.split(".")[0] not in OWN_MODULES]
        os.write(write, "\n".join(names).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        names = stream.read().decode().split("\n")
    os.waitpid(probe, 0)
    for name in names:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # a module that only imports inside its package's own import: it comes with it
                pass
    return _import_fairseq()


def _import_fairseq():
    """Import fairseq's modules, keeping for the commands what the import does to logging: its
    speech tasks call ``logging.basicConfig`` (INFO, stderr) and log a line, and which of that
    takes effect depends on the command (fairseq-train configures logging before importing
    fairseq, so its own format wins; fairseq-generate after, so fairseq's wins). Here the calls
    and the records are recorded, nothing is printed, and the root logger is left as it was;
    each child replays them when its command first imports fairseq (``_replay_at_fairseq_import``),
    where a fresh interpreter would run them."""
    events, root = [], logging.getLogger()
    handlers, level = list(root.handlers), root.level
    basic_config, handle = logging.basicConfig, logging.Logger.handle

    def recording_basic_config(**kwargs):
        events.append(("basicConfig", kwargs))
        basic_config(**kwargs)  # applied, so that the levels decide which records exist, as they would

    logging.basicConfig = recording_basic_config
    logging.Logger.handle = lambda logger, record: events.append(("record", record))
    try:
        for name in FAIRSEQ:
            importlib.import_module(name)
    finally:
        logging.basicConfig, logging.Logger.handle = basic_config, handle
        root.handlers[:] = handlers
        root.setLevel(level)
    return events


def _replay_at_fairseq_import(events):
    """In the child: at the command's first ``import fairseq...``, what fairseq's import did to
    logging (``_import_fairseq``), in order, under the command's logging configuration."""
    original = builtins.__import__

    def first_fairseq_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] == "fairseq":
            builtins.__import__ = original
            for kind, event in events:
                if kind == "basicConfig":
                    logging.basicConfig(**event)
                    continue
                logger = logging.getLogger(event.name)
                if logger.isEnabledFor(event.levelno):
                    event.created, event.process = time.time(), os.getpid()
                    event.msecs = (event.created - int(event.created)) * 1000
                    logger.handle(event)
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = first_fairseq_import


def _serve(commands_fd, replies_fd):
    """The server's loop; returns only in a forked child, with the request it must run."""
    buffer, children = b"", {}  # pid -> request id
    while True:
        ready, _, _ = select.select([commands_fd], [], [], 0.02 if children else None)
        if ready:
            chunk = os.read(commands_fd, 65536)
            if not chunk:  # the client is gone (its tests are over): stop what still runs
                for pid in children:
                    try:
                        os.killpg(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                os._exit(0)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                if "kill" in request:
                    for pid, ident in children.items():
                        if ident == request["kill"]:
                            try:
                                os.killpg(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                    continue
                pid = os.fork()
                if pid == 0:
                    os.close(commands_fd)
                    os.close(replies_fd)
                    return request
                children[pid] = request["id"]
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            ident = children.pop(pid)
            os.write(replies_fd, (json.dumps({"id": ident, "returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


def _become(request):
    """In the child: the command's files, environment, argv and sys.path, as a fresh start gives them."""
    os.setpgid(0, 0)
    for fd, path, mode in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                           (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    return _command(request["argv"], request["env"], request["cwd"])


def _command(argv, env, cwd):
    """The command's environment, working directory, argv and sys.path; returns what to run:
    ``("module" | "script" | "console", name)``. ``python -u`` (torchrun's ranks) unbuffers
    stdout and stderr, as the interpreter's flag does."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if argv[0] == sys.executable and argv[1] == "-u":
        argv = argv[:1] + argv[2:]
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(write_through=True)
    if argv[0] == sys.executable and argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]  # runpy puts the module's path in argv[0]
        sys.path[0] = os.getcwd()
        return ("module", argv[2])
    if argv[0] == sys.executable:
        sys.argv = argv[1:]
        sys.path[0] = os.path.dirname(os.path.abspath(argv[1]))
        return ("script", argv[1])
    sys.argv = [os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]]
    sys.path[0] = os.path.dirname(sys.executable)
    return ("console", argv[0])


def _entry_point(name):
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="console_scripts", name=name)
    return entry.load()


# ---------------------------------------------------------------- the client (in the test process)


class ForkServer:
    """One server process and the commands it runs; ``run`` may be called from several threads at once."""

    def __init__(self, env, cwd):
        commands_r, self._commands = os.pipe()
        replies, replies_w = os.pipe()
        self.env = {key: env.get(key) for key in IMPORT_TIME_ENV}
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(commands_r), str(replies_w)], pass_fds=(commands_r, replies_w),
            env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(commands_r)
        os.close(replies_w)
        self._write_lock, self._done, self._ids = threading.Lock(), {}, itertools.count()
        self._changed, self.dead = threading.Condition(), False
        threading.Thread(target=self._read_replies, args=(replies,), daemon=True).start()

    def _read_replies(self, fd):
        with os.fdopen(fd, "rb") as replies:
            for line in replies:
                reply = json.loads(line)
                with self._changed:
                    self._done[reply["id"]] = reply["returncode"]
                    self._changed.notify_all()
        with self._changed:
            self.dead = True
            self._changed.notify_all()

    def _send(self, request):
        with self._write_lock:
            os.write(self._commands, (json.dumps(request) + "\n").encode())

    def run(self, argv, env, cwd, stdin=None, timeout=600):
        """Like ``subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True,
        timeout=timeout)``: a ``CompletedProcess`` (``TimeoutExpired`` after killing the command)."""
        if {key: env.get(key) for key in IMPORT_TIME_ENV} != self.env:
            raise ValueError("the fork server was started with another import-time environment")
        with tempfile.TemporaryDirectory(prefix="forked-cli-") as folder:
            paths = {name: os.path.join(folder, name) for name in ("stdin", "stdout", "stderr")}
            for name, text in (("stdin", stdin or ""), ("stdout", ""), ("stderr", "")):
                with open(paths[name], "w") as stream:
                    stream.write(text)
            ident = next(self._ids)
            self._send({"id": ident, "argv": list(argv), "env": dict(env), "cwd": cwd, **paths})
            with self._changed:
                finished = self._changed.wait_for(lambda: ident in self._done or self.dead, timeout)
            if not finished:
                self._send({"kill": ident})
                with self._changed:
                    self._changed.wait_for(lambda: ident in self._done or self.dead, 60)
                raise subprocess.TimeoutExpired(argv, timeout)
            if ident not in self._done:
                self._log.seek(0)
                raise RuntimeError(f"the fork server died:\n{self._log.read().decode(errors='replace')[-3000:]}")
            returncode = self._done.pop(ident)
            with open(paths["stdout"]) as out, open(paths["stderr"]) as err:
                return subprocess.CompletedProcess(list(argv), returncode, out.read(), err.read())

    def close(self):
        os.close(self._commands)  # the server ends what still runs, then exits
        self.process.wait(60)


_servers = {}
_servers_lock = threading.Lock()


def run_forked(argv, env, cwd, stdin=None, timeout=600):
    """``argv`` (a ``fairseq-*`` console script, ``sys.executable -m MODULE ...`` or
    ``sys.executable SCRIPT ...``) as a child of this process's fork server."""
    key = (tuple(env.get(name) for name in IMPORT_TIME_ENV), cwd)
    with _servers_lock:
        server = _servers.get(key)
        if server is None or server.dead:
            server = _servers[key] = ForkServer(env, cwd)
            atexit.register(server.close)
    return server.run(argv, env, cwd, stdin, timeout)


if __name__ == "__main__":
    fairseq_logging = _preload()
    import forked_torchrun  # (tests/ is sys.path[0] until a command's own path replaces it)
    gc.freeze()  # the preloaded modules, shared with every child: no child's collections scan (and copy) them
    kind, target = _become(_serve(int(sys.argv[1]), int(sys.argv[2])))
    if (kind, target) == ("module", "torch.distributed.run"):  # its ranks are forked too (tests/forked_torchrun.py)
        kind, target = forked_torchrun.start_zygote(_command, IMPORT_TIME_ENV) or (kind, target)
    _replay_at_fairseq_import(fairseq_logging)
    import runpy

    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "script":
        runpy.run_path(target, run_name="__main__")
    else:
        sys.exit(_entry_point(target)())
