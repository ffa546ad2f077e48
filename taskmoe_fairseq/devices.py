"""Which device a command runs a model on: ``--device {auto,cpu,cuda}`` and ``--device-index N``.

The same choice as CTranslate2's ``device`` / ``device_index`` arguments and fairseq's
``--cpu`` (fairseq runs on CUDA when ``torch.cuda.is_available()`` and ``--cpu`` is not given):
``auto`` takes CUDA device ``N`` when one is present and the CPU otherwise; ``cuda`` without a
CUDA device is an error, not a silent fall-back to the CPU. Used by
``python -m taskmoe_fairseq.translate`` (checkpoints and CTranslate2 folders); the server is
meant to use it too.
"""

from typing import Optional

import torch

from taskmoe_fairseq.errors import usage_error

DEVICES = ("auto", "cpu", "cuda")


def add_device_args(parser):
    """Add ``--device`` and ``--device-index`` to an argparse ``parser``."""
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto (default): CUDA when a CUDA device is present, else the CPU; cpu; cuda")
    parser.add_argument("--device-index", type=int, default=None, metavar="N",
                        help="which CUDA device (default 0), as CTranslate2's device_index")


def resolve_device(name: str = "auto", index: Optional[int] = None, cuda_devices: Optional[int] = None) -> torch.device:
    """The device for ``--device name --device-index index``.

    Args:
        name: ``auto``, ``cpu`` or ``cuda``.
        index: CUDA device number; None means 0. Ignored when ``auto`` falls back to the CPU.
        cuda_devices: how many CUDA devices the backend sees; None means
            ``torch.cuda.device_count()`` (0 for a CPU-only torch). CTranslate2 has its own CUDA
            build, so its caller passes ``ctranslate2.get_cuda_device_count()``.
    Returns:
        ``torch.device("cpu")`` or ``torch.device("cuda", index)``.
    Raises:
        TaskMoeError: an unknown name, a negative index, ``cuda`` with no CUDA device, an index
            beyond the CUDA devices, or an index given with ``cpu``.
    """
    if name not in DEVICES:
        raise usage_error(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    if index is not None and index < 0:
        raise usage_error(f"--device-index must be at least 0, got {index}")
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if name == "cpu":
        if index not in (None, 0):
            raise usage_error(f"--device-index {index} numbers CUDA devices; drop it with --device cpu")
        return torch.device("cpu")
    if name == "auto" and count == 0:
        return torch.device("cpu")
    if count == 0:
        raise usage_error("--device cuda: no CUDA device is visible to this process; use --device cpu (or auto)")
    index = index or 0
    if index >= count:
        raise usage_error(
            f"--device-index {index}: this process sees {count} CUDA device{'s' if count > 1 else ''} "
            f"(0 to {count - 1}); choose one of them"
        )
    return torch.device("cuda", index)
