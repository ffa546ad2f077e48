import gc
import os
import shutil
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock, Timeout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_helpers import (  # noqa: E402
    REPO,
    make_raw_fixture,
    python_module,
    run,
    run_warm,
    train_command,
)

# In-process tests run tiny models: one intra-op thread is faster than two that wait on each
# other, and it leaves the second core to the CLI subprocesses some tests start.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Keep every in-process test at one thread: a script's ``main`` run in-process (the
    benchmarks set 2) must not leave the tests after it running two threads that wait on each
    other (measured: 35x slower generation under load)."""
    yield
    torch.set_num_threads(1)


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


def build_once(folder, build, wait=True):
    """``build(folder)`` once per run: the first worker to take the lock builds, the others wait
    for it and reuse the folder. A build that failed leaves no ``.done`` marker and is redone.
    ``wait=False``: return None at once if someone else is building it."""
    lock = FileLock(folder + ".lock")
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
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


def binarized_data(shared_root, wait=True):
    folder = build_once(os.path.join(shared_root, "data"), _binarize, wait)
    return folder and os.path.join(folder, "bin")


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
    """Models trained once per run through the real fairseq-train, keyed by routing (shared by
    the xdist workers: the first to ask trains, the others wait and load the same checkpoint).
    fairseq-train runs forked from an interpreter that has imported torch and fairseq already
    (``cli_helpers.run_warm``); its cold start is tested by test_cli_end_to_end's resume."""

    def __init__(self, data, root):
        self.data, self.root = data, root

    def _folder(self, encoder_routing, decoder_routing, max_update, extra):
        name = "-".join([encoder_routing, decoder_routing, str(max_update), *extra]).replace("--", "")
        return os.path.join(self.root, name)

    def get(self, encoder_routing, decoder_routing, max_update=12, extra=(), wait=True):
        """The checkpoint's path (None with ``wait=False`` while another worker trains it)."""

        def train(save_dir):
            command = train_command(self.data, save_dir, encoder_routing, decoder_routing, max_update, extra)
            _save_log(save_dir, "train", run_warm(command))

        folder = build_once(self._folder(encoder_routing, decoder_routing, max_update, tuple(extra)), train, wait)
        return folder and os.path.join(folder, "checkpoint_last.pt")

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


def ddp_trained(data_dir, shared_root, wait=True):
    def train(save_dir):
        for max_update, start_method in ((6, "fork"), (12, "exec")):
            command = train_command(data_dir, save_dir, "token", "target", max_update, DDP_EXTRA)[1:]  # drop "fairseq-train"
            launch = ("--nprocs", "2", "--start-method", start_method, "--")
            result = run_warm(python_module("taskmoe_fairseq.cpu_data_parallel", *launch, *command))
            _save_log(save_dir, f"train{max_update}", result)

    return build_once(os.path.join(shared_root, "ddp"), train, wait)


@pytest.fixture(scope="session")
def ddp_checkpoint(data_dir, shared_root):
    """token/target trained by 2 CPU ranks (gloo), then resumed by 2 ranks (losses logged every
    update: the expert-parallel test compares them). The launcher is forked (``run_warm``); it
    forks the first run's ranks (its default) and starts the resumed run's as new fairseq-train
    processes (``--start-method exec``), so the two start methods give one loss curve."""
    save_dir = ddp_trained(data_dir, shared_root)
    return os.path.join(save_dir, "checkpoint_last.pt"), [_read_log(save_dir, f"train{n}") for n in (6, 12)]


# ---------------------------------------------------------------- background builds
# A worker whose test asks for a model that the other worker is still training waits, idle. So
# each worker starts, in a background thread, the long shared builds that its collected tests will
# need, longest first; one the other worker has taken already is skipped (its lock is not waited
# for). The builds are subprocesses, so the thread only waits.

def _module(item):
    return getattr(getattr(item, "module", None), "__name__", None)


USES_TOKEN_TARGET = {"test_bad_input", "test_cli_end_to_end", "test_export", "test_extract", "test_hub", "test_model_identity", "test_sampling",
                     "test_no_dropped_sentences", "test_scoring", "test_serve", "test_translate", "test_zero_shot"}
BACKGROUND_BUILDS = [  # (name, build(data_dir, shared_root), used by this collected test?)
    ("target/target, 300 updates", lambda data, root: trained_models(data, root).get("target", "target", 300, wait=False),
     lambda item: _module(item) in {"test_export", "test_translate", "test_serve"}),
    ("2-rank token/target", lambda data, root: ddp_trained(data, root, wait=False),
     lambda item: "ddp_checkpoint" in item.fixturenames),
    ("token/target", lambda data, root: trained_models(data, root).get("token", "target", wait=False),
     lambda item: _module(item) in USES_TOKEN_TARGET),
]


def _build_in_background(shared_root, builds):
    log = os.path.join(shared_root, f"background-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.log")
    with open(log, "a", encoding="utf-8") as out:
        try:
            data = binarized_data(shared_root)
            for name, build, _ in builds:
                started = time.time()
                done = build(data, shared_root)
                out.write(f"{name}: {'ready' if done else 'taken by another worker'} ({time.time() - started:.0f} s)\n")
        except Exception as error:  # the test that needs the build redoes it (no .done marker) and reports
            out.write(f"stopped: {error!r}\n")


@pytest.fixture(scope="session", autouse=True)
def background_builds(request, shared_root):
    builds = [entry for entry in BACKGROUND_BUILDS if any(entry[2](item) for item in request.session.items)]
    if builds:
        threading.Thread(target=_build_in_background, args=(shared_root, builds), daemon=True).start()


# ---------------------------------------------------------------- scheduling on pytest-xdist workers
# pytest.ini passes --dist loadgroup --no-loadscope-reorder (used with -n only). A module whose
# module-scoped fixtures are costly runs whole on one worker (split over two, it would build them
# twice); the three modules on the 300-update model share one worker. Work is handed out in the
# order below: first the benchmarks (they need no data, so they run while the data is binarized),
# then the groups, then the modules with long single tests; everything after is dealt out one
# test at a time, so the workers end within a short test of each other.

XDIST_GROUPS = {
    "test_export": "target300", "test_translate": "target300", "test_serve": "target300",
    "test_benchmarks": "benchmarks", "test_expert_parallel_training": "expert_parallel", "test_plugin": "plugin",
}
MODULES_FIRST = [
    "test_benchmarks", "test_export", "test_translate", "test_serve", "test_expert_parallel_training", "test_plugin",
    "test_expert_parallel_equivalence", "test_distributed", "test_zero_shot", "test_cli_end_to_end", "test_extract",
]


def pytest_collection_finish(session):
    """Every test module is imported (torch, fairseq, the plugin and their hundreds of thousands
    of objects, alive to the end): take them out of the garbage collector's view, so that each
    full collection (Python's own, and those that tests, the benchmarks and torch's profiler ask
    for) scans only what the tests make (measured: a third of a second per collection)."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _module(item) in XDIST_GROUPS:
            item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS[_module(item)]))
    rank = {name: index for index, name in enumerate(MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: modules stay whole and in order
