"""``--device {auto,cpu,cuda}`` / ``--device-index N`` (taskmoe_fairseq.devices): the choice
CTranslate2's ``device`` / ``device_index`` and fairseq's ``--cpu`` make, with one-line errors.
``cuda_devices`` is the number of CUDA devices the backend sees, so every case runs on any machine."""

import pytest
import torch

from taskmoe_fairseq.devices import resolve_device
from taskmoe_fairseq.errors import TaskMoeError


@pytest.mark.parametrize("name, index, cuda_devices, want", [
    ("auto", None, 0, torch.device("cpu")),
    ("auto", 3, 0, torch.device("cpu")),  # auto falls back to the CPU whatever index a script passes
    ("auto", None, 2, torch.device("cuda", 0)),
    ("auto", 1, 2, torch.device("cuda", 1)),
    ("cpu", None, 2, torch.device("cpu")),
    ("cpu", 0, 0, torch.device("cpu")),
    ("cuda", None, 1, torch.device("cuda", 0)),
    ("cuda", 3, 4, torch.device("cuda", 3)),
])
def test_resolve_device(name, index, cuda_devices, want):
    assert resolve_device(name, index, cuda_devices) == want


@pytest.mark.parametrize("name, index, cuda_devices, message", [
    ("cuda", None, 0, "--device cuda: no CUDA device is visible to this process; use --device cpu (or auto)"),
    ("cuda", 2, 2, "--device-index 2: this process sees 2 CUDA devices (0 to 1); choose one of them"),
    ("auto", 1, 1, "--device-index 1: this process sees 1 CUDA device (0 to 0)"),
    ("cpu", 1, 2, "--device-index 1 numbers CUDA devices; drop it with --device cpu"),
    ("cuda", -1, 2, "--device-index must be at least 0, got -1"),
    ("gpu", None, 2, "--device 'gpu': choose one of auto, cpu, cuda"),
])
def test_bad_device_choices_are_one_line(name, index, cuda_devices, message):
    with pytest.raises(TaskMoeError) as error:
        resolve_device(name, index, cuda_devices)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_default_counts_torchs_cuda_devices():
    want = torch.device("cuda", 0) if torch.cuda.device_count() else torch.device("cpu")
    assert resolve_device() == resolve_device("auto", None, torch.cuda.device_count()) == want
