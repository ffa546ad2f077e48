"""The plugin as users load it: import, registries."""

import sys

from cli_helpers import run


def test_importing_the_plugin_prints_nothing():
    result = run([sys.executable, "-c", "import taskmoe_fairseq"])
    assert result.stdout == "" and result.stderr == ""


def test_importing_the_plugin_leaves_the_programs_logging_alone():
    # fairseq's speech tasks call logging.basicConfig(level=DEBUG) at import time
    code = "import logging, taskmoe_fairseq; root = logging.getLogger(); print(root.level, len(root.handlers))"
    assert run([sys.executable, "-c", code]).stdout.split() == ["30", "0"]


def test_importing_registers_task_model_presets_and_criterion():
    import taskmoe_fairseq  # noqa: F401
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    assert "multilingual_translation_taskmoe" in TASK_REGISTRY
    assert "moe_label_smoothed_cross_entropy" in CRITERION_REGISTRY
    for arch in ("taskmoe_transformer", "taskmoe_transformer_small", "taskmoe_transformer_tiny"):
        assert ARCH_MODEL_REGISTRY[arch].__name__ == "TaskMoeTransformerModel"
