"""Timing discipline shared by every measuring script, and the JSON record they write.

The machine is shared, so nothing compared is an absolute time: every comparison runs the
compared things in one process, interleaved (the order rotates every round) and repeated;
what is reported is the median over rounds of the per-round ratio, so a slow phase of the
machine hits numerator and denominator alike. Nothing here asserts on wall-clock time.
"""

import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, Hashable, List

SCHEMA = 1  # version of the JSON layout below; report.py checks it


def median(values):
    return statistics.median(values) if values else float("nan")


def rotated(items: list, shift: int) -> list:
    if not items:
        return []
    shift %= len(items)
    return items[shift:] + items[:shift]


def interleaved_rounds(runners: Dict[Hashable, Callable[[], object]], rounds: int, on_round=None) -> Dict[Hashable, List]:
    """Run every runner once per round, the order rotating from round to round.

    A runner returns seconds (a float) or any measurement; returns ``key -> [per-round value]``."""
    keys = list(runners)
    out = {key: [] for key in keys}
    for round_index in range(rounds):
        gc.collect()
        for key in rotated(keys, round_index):
            out[key].append(runners[key]())
        if on_round is not None:
            on_round(round_index)
    return out


def paired_ratio(seconds: List[float], reference_seconds: List[float]) -> float:
    """Speed of ``seconds`` relative to the reference measured in the same rounds:
    median over rounds of reference / mine (> 1: faster than the reference)."""
    return median([ref / mine for mine, ref in zip(seconds, reference_seconds)])


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int, script: str, argv=None) -> dict:
    """Command (``script`` run with ``argv``, default this process's), hardware, date and versions."""
    import fairseq
    import torch

    script = os.path.relpath(os.path.abspath(script), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {
        "command": shlex.join(["python", script] + list(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fairseq": getattr(fairseq, "__version__", "?"),
        "load_average_at_start": list(os.getloadavg()),
    }


class Run:
    """One measuring script's run: its log, environment and JSON output."""

    def __init__(self, kind: str, script: str, argv, threads: int, config: dict):
        import torch

        torch.set_num_threads(threads)
        self.started = time.perf_counter()
        self.record = {"schema": SCHEMA, "kind": kind, "environment": environment(threads, script, argv), "config": config, "results": {}}

    def log(self, message: str):
        print(f"[{time.perf_counter() - self.started:6.0f}s] {message}", flush=True)

    def write(self, path: str):
        self.record["wall_seconds"] = time.perf_counter() - self.started
        self.record["environment"]["load_average_at_end"] = list(os.getloadavg())
        from taskmoe_fairseq.files import atomic_write_text  # the measuring scripts put the repository on sys.path

        atomic_write_text(path, json.dumps(self.record, indent=1, default=float))
        self.log(f"wrote {path}")
