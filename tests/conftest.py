import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_helpers import (  # noqa: E402
    REPO,
    make_raw_fixture,
    python_module,
    run,
    train_command,
)

# In-process tests run tiny models: one intra-op thread is faster than two that wait on each
# other, and it leaves the second core to the CLI subprocesses some tests start.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The bundled real text, binarized by examples/data/binarize.py (SentencePiece + fairseq-preprocess)."""
    root = tmp_path_factory.mktemp("data")
    raw = make_raw_fixture(str(root))
    binarized = str(root / "bin")
    run([sys.executable, os.path.join(REPO, "examples", "data", "binarize.py"),
         "--raw", raw, "--out", binarized, "--vocab-size", "1000", "--workers", "1"])
    return binarized


class TrainedModels:
    """Models trained once per session through the real fairseq-train, keyed by routing."""

    def __init__(self, data, root):
        self.data, self.root, self.cache = data, root, {}

    def get(self, encoder_routing, decoder_routing, max_update=12, extra=()):
        key = (encoder_routing, decoder_routing, max_update, tuple(extra))
        if key not in self.cache:
            save_dir = os.path.join(self.root, f"{encoder_routing}-{decoder_routing}-{max_update}-{len(self.cache)}")
            result = run(train_command(self.data, save_dir, encoder_routing, decoder_routing, max_update, extra))
            self.cache[key] = (os.path.join(save_dir, "checkpoint_last.pt"), result)
        return self.cache[key][0]

    def log(self, *key):
        return self.cache[key][1]


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    return TrainedModels(data_dir, str(tmp_path_factory.mktemp("models")))


DDP_EXTRA = ("--log-interval", "1")


@pytest.fixture(scope="session")
def ddp_checkpoint(data_dir, tmp_path_factory):
    """token/target trained by 2 CPU ranks (gloo), then resumed by 2 ranks (losses logged every
    update: the expert-parallel test compares them)."""
    save_dir = str(tmp_path_factory.mktemp("ddp"))
    logs = []
    for max_update in (6, 12):
        command = train_command(data_dir, save_dir, "token", "target", max_update, DDP_EXTRA)[1:]  # drop "fairseq-train"
        logs.append(run(python_module("taskmoe_fairseq.cpu_data_parallel", "--nprocs", "2", "--", *command)))
    return os.path.join(save_dir, "checkpoint_last.pt"), logs
