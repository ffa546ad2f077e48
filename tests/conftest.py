import logging
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_helpers import (  # noqa: E402
    REPO,
    make_raw_fixture,
    run,
    run_in_process,
    train_command,
)

# In-process tests run tiny models: one intra-op thread is faster than two that wait on each
# other, and it leaves the second core to the other pytest-xdist worker.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Keep every in-process test at one thread: a script's ``main`` run in-process (the
    benchmarks set 2) must not leave the tests after it running two threads that wait on each
    other (measured: 35x slower generation under load)."""
    yield
    torch.set_num_threads(1)


LIBRARY_LOGGERS = ("fairseq", "fairseq_cli", "taskmoe_fairseq")


@pytest.fixture(scope="session")
def initial_process_state():
    """The library loggers' levels and ``sys.excepthook`` (the plugin's one-line hook) as the tests begin."""
    return {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}, sys.excepthook


@pytest.fixture(autouse=True)
def process_state(initial_process_state):
    """Put back after each test what code run in-process may change for good, so that the commands
    run in-process after it (``cli_helpers.run_in_process``) log and fail as a real process does:
    the library loggers' levels (benchmarks/models.py sets fairseq's and the plugin's to WARNING
    when imported) and ``sys.excepthook`` (torch's ``init_process_group`` wraps it to prefix
    ``[rankN]:``, and ``destroy_process_group`` leaves the wrapper)."""
    yield
    levels, excepthook = initial_process_state
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    sys.excepthook = excepthook


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory):
    """A folder every pytest-xdist worker of this run shares (the run's base temp folder), so the
    expensive fixtures below are built once per run, not once per worker. For work on the tests
    only: ``TASKMOE_TESTS_SHARED=FOLDER`` keeps them there from one run to the next (rebuild by
    deleting the folder whenever the plugin or the fixtures change; CI never sets it)."""
    if os.environ.get("TASKMOE_TESTS_SHARED"):
        os.makedirs(os.environ["TASKMOE_TESTS_SHARED"], exist_ok=True)
        return os.environ["TASKMOE_TESTS_SHARED"]
    base = tmp_path_factory.getbasetemp()
    return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def build_once(folder, build):
    """``build(folder)`` once per run: the first worker to take the lock builds, the others wait
    for it and reuse the folder. A build that failed leaves no ``.done`` marker and is redone."""
    lock = FileLock(folder + ".lock")
    lock.acquire()
    try:
        if not os.path.exists(folder + ".done"):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            build(folder)
            open(folder + ".done", "w").close()
    finally:
        lock.release()
    return folder


def _binarize(root):
    raw = make_raw_fixture(root)
    run([sys.executable, os.path.join(REPO, "examples", "data", "binarize.py"),
         "--raw", raw, "--out", os.path.join(root, "bin"), "--vocab-size", "1000", "--workers", "1"])


def binarized_data(shared_root):
    return os.path.join(build_once(os.path.join(shared_root, "data"), _binarize), "bin")


@pytest.fixture(scope="session")
def data_dir(shared_root):
    """The bundled real text, binarized by examples/data/binarize.py (SentencePiece + fairseq-preprocess)."""
    return binarized_data(shared_root)


def _save_log(folder, name, result):
    for stream in ("stdout", "stderr"):
        with open(os.path.join(folder, f"{name}.{stream}"), "w", encoding="utf-8") as out:
            out.write(getattr(result, stream))


def _read_log(folder, name):
    streams = {}
    for stream in ("stdout", "stderr"):
        with open(os.path.join(folder, f"{name}.{stream}"), encoding="utf-8") as log:
            streams[stream] = log.read()
    return SimpleNamespace(**streams)


class TrainedModels:
    """Models trained once per run by fairseq-train's ``cli_main`` in this process
    (``cli_helpers.run_in_process``), keyed by routing (shared by the xdist workers: the first to
    ask trains, the others wait and load the same checkpoint). fairseq-train as a real process:
    test_cli_end_to_end's resume."""

    def __init__(self, data, root):
        self.data, self.root = data, root

    def _folder(self, encoder_routing, decoder_routing, max_update, extra):
        name = "-".join([encoder_routing, decoder_routing, str(max_update), *extra]).replace("--", "")
        return os.path.join(self.root, name)

    def get(self, encoder_routing, decoder_routing, max_update=12, extra=()):
        """The checkpoint's path."""

        def train(save_dir):
            command = train_command(self.data, save_dir, encoder_routing, decoder_routing, max_update, extra)
            _save_log(save_dir, "train", run_in_process(command))

        folder = build_once(self._folder(encoder_routing, decoder_routing, max_update, tuple(extra)), train)
        return os.path.join(folder, "checkpoint_last.pt")

    def log(self, encoder_routing, decoder_routing, max_update=12, extra=()):
        """fairseq-train's stdout and stderr (``.stdout``, ``.stderr``) for a model ``get`` trained."""
        return _read_log(self._folder(encoder_routing, decoder_routing, max_update, tuple(extra)), "train")


def trained_models(data_dir, shared_root):
    root = os.path.join(shared_root, "models")
    os.makedirs(root, exist_ok=True)
    return TrainedModels(data_dir, root)


@pytest.fixture(scope="session")
def trained(data_dir, shared_root):
    return trained_models(data_dir, shared_root)


DDP_EXTRA = ("--log-interval", "1")


def ddp_trained(data_dir, shared_root):
    def train(save_dir):
        from rank_runs import torchrun

        for max_update, world_size in ((6, ()), (12, ("--distributed-world-size", "2"))):
            args = train_command(data_dir, save_dir, "token", "target", max_update, DDP_EXTRA)[1:]  # drop "fairseq-train"
            _save_log(save_dir, f"train{max_update}", run(torchrun(2, [*args, *world_size], "legacy_ddp")))

    return build_once(os.path.join(shared_root, "ddp"), train)


@pytest.fixture(scope="session")
def ddp_checkpoint(data_dir, shared_root):
    """token/target trained by 2 CPU ranks (torchrun, gloo, legacy_ddp) for 6 updates, then
    resumed by 2 ranks to 12 (losses logged every update: the expert-parallel test compares them).
    The first run takes its world size from torchrun, the resumed one is also given fairseq's
    ``--distributed-world-size 2`` (both work on CPU: ``compat/distributed.py``)."""
    save_dir = ddp_trained(data_dir, shared_root)
    return os.path.join(save_dir, "checkpoint_last.pt"), [_read_log(save_dir, f"train{n}") for n in (6, 12)]
