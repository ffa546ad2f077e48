"""Safe loading holds on every fairseq path the plugin is imported into, whatever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: a checkpoint whose pickle runs code is refused with
one line, and its code never runs."""

import importlib
import inspect
import io
import os

import pytest
import torch

from cli_helpers import ENV, TASK_ARGS, generate_command, run_in_process, train_command
from taskmoe_fairseq.compat import distributed
from taskmoe_fairseq.errors import usage_error

UNSAFE_ENV = dict(ENV, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
REFUSAL = "refused by torch's safe loader"
UsageError = type(usage_error("probe"))


class WritesMarker:
    """Unpickling this runs ``exec``: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def code_carrying_checkpoint(tmp_path):
    marker = str(tmp_path / "payload-ran")
    path = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "args": None, "cfg": None, "payload": WritesMarker(marker)}, path)
    return path, marker


def run_unsafe(command, stdin=None):
    """``command`` in this process with the variable set (cli_helpers.run_in_process; torch and
    the plugin read it when they load, not when they are imported)."""
    return run_in_process(command, check=False, stdin=stdin, env=UNSAFE_ENV)


def assert_refused(result, path, marker):
    assert not os.path.exists(marker), "the checkpoint's code ran"
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if REFUSAL in line]
    assert len(lines) == 1 and path in lines[0] and "it holds exec" in lines[0], result.stderr[-3000:]
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in lines[0]


def test_generate_and_interactive_refuse_code_under_the_env_var(code_carrying_checkpoint, data_dir):
    path, marker = code_carrying_checkpoint
    generate = generate_command(data_dir, path, "en-de", beam=1)
    interactive = ["fairseq-interactive", data_dir, *TASK_ARGS, "--source-lang", "en", "--target-lang", "de",
                   "--path", path, "--cpu"]
    for result in (run_unsafe(generate), run_unsafe(interactive, "hello\n")):
        assert_refused(result, path, marker)


@pytest.mark.parametrize("option", ["--restore-file", "--finetune-from-model"])
def test_train_refuses_code_under_the_env_var(option, code_carrying_checkpoint, data_dir, tmp_path):
    path, marker = code_carrying_checkpoint
    command = train_command(data_dir, str(tmp_path / "ckpt"), "token", "target", 1) + [option, path]
    assert_refused(run_unsafe(command), path, marker)


def test_hub_interface_refuses_code_under_the_env_var(code_carrying_checkpoint, monkeypatch):
    from fairseq import hub_utils

    path, marker = code_carrying_checkpoint
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UsageError) as refused:
        hub_utils.from_pretrained(os.path.dirname(path), checkpoint_file=os.path.basename(path))
    assert REFUSAL in str(refused.value) and path in str(refused.value)
    assert not os.path.exists(marker)


def test_a_broadcast_object_is_unpickled_safely_under_the_env_var(tmp_path, monkeypatch):
    """What a rank > 0 receives from rank 0 (resuming without --load-checkpoint-on-all-dp-ranks)
    goes through fairseq.distributed.utils' torch.load."""
    from fairseq.distributed import utils as distributed_utils

    marker = str(tmp_path / "payload-ran")
    buffer = io.BytesIO()
    torch.save({"payload": WritesMarker(marker)}, buffer)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="Unsupported global"):
        distributed_utils.torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu")
    assert not os.path.exists(marker)


def test_rank_zeros_broadcast_copy_of_a_checkpoint_passes_the_safe_loader(tmp_path):
    """Rank 0's in-memory checkpoint holds the DictConfig fairseq's loader made of ``cfg``; what the
    plugin broadcasts is plain containers (and fairseq's tensor placeholders), which load safely."""
    from fairseq.distributed import utils as distributed_utils
    from omegaconf import OmegaConf

    state = {
        "cfg": OmegaConf.create({"model": {"arch": "taskmoe_transformer_tiny", "dropout": 0.1}}),
        "model": {"weight": torch.ones(2)},
        "extra_state": {"train_iterator": {"epoch": 1}},
    }
    tensors = []
    sent = distributed._plain(distributed_utils._split_tensors_from_obj(state, tensors))
    buffer = io.BytesIO()
    torch.save(sent, buffer)
    received = distributed_utils.torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu")
    assert received["cfg"] == {"model": {"arch": "taskmoe_transformer_tiny", "dropout": 0.1}}
    assert distributed_utils._put_tensors_in_obj(received, tensors)["model"]["weight"].tolist() == [1.0, 1.0]


FAIRSEQ_LOADING_MODULES = [
    "fairseq.checkpoint_utils", "fairseq.distributed.utils", "fairseq.trainer", "fairseq.hub_utils",
    "fairseq.models.fairseq_model", "fairseq_cli.train", "fairseq_cli.generate", "fairseq_cli.interactive",
]


def test_every_fairseq_module_on_the_translation_path_loads_safely():
    """Every module of fairseq's translation path that calls torch.load (today checkpoint_utils and
    distributed.utils) sees a torch whose load always passes weights_only=True."""
    loading = []
    for name in FAIRSEQ_LOADING_MODULES:
        module = importlib.import_module(name)
        if "torch.load(" in inspect.getsource(module):
            loading.append(name)
            assert getattr(module.torch, "_taskmoe_safe_load", False), f"{name} calls torch.load unprotected"
    assert {"fairseq.checkpoint_utils", "fairseq.distributed.utils"} <= set(loading)
