"""The plugin as users load it: import, registries."""

import re
import sys

import pytest

from cli_helpers import run

IMPORT_AND_REPORT_LOGGING = "import logging, taskmoe_fairseq; root = logging.getLogger(); print(root.level, len(root.handlers))"


@pytest.fixture(scope="module")
def fresh_import():
    """``import taskmoe_fairseq`` in a fresh interpreter (one for both tests below), then the root
    logger's level and handler count printed: whatever else reaches stdout or stderr came from the import."""
    return run([sys.executable, "-c", IMPORT_AND_REPORT_LOGGING])


@pytest.mark.slow
def test_importing_the_plugin_prints_nothing(fresh_import):
    assert fresh_import.stderr == ""
    assert re.fullmatch(r"\d+ \d+\n", fresh_import.stdout), fresh_import.stdout  # the probe's line alone


@pytest.mark.slow
def test_importing_the_plugin_leaves_the_programs_logging_alone(fresh_import):
    # fairseq's speech tasks call logging.basicConfig(level=DEBUG) at import time
    assert fresh_import.stdout.split() == ["30", "0"]


def test_importing_registers_task_model_presets_and_criterion():
    import taskmoe_fairseq  # noqa: F401
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    assert "multilingual_translation_taskmoe" in TASK_REGISTRY
    assert "moe_label_smoothed_cross_entropy" in CRITERION_REGISTRY
    for arch in ("taskmoe_transformer", "taskmoe_transformer_small", "taskmoe_transformer_tiny"):
        assert ARCH_MODEL_REGISTRY[arch].__name__ == "TaskMoeTransformerModel"
