"""tests/forked_cli.py (``cli_helpers.run_warm``) gives what a fresh interpreter gives: the same
exit status, stdout and stderr, for a ``-m`` module and a script, with stdin passed through
(the one-line errors of the plugin's commands included), and for fairseq's own commands, whose
logging depends on whether they configure it before or after importing fairseq (the fork server
has imported fairseq already and replays what that import did to logging)."""

import os
import re
import sys

from cli_helpers import REPO, generate_command, python_module, run, run_warm, train_command

BUILD_CORPUS = os.path.join(REPO, "examples", "data", "build_corpus.py")


def assert_same(command, stdin=None):
    fresh, forked = run(command, check=False, stdin=stdin), run_warm(command, check=False, stdin=stdin)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    return forked


def test_a_module_exits_and_prints_as_in_a_fresh_interpreter(tmp_path):
    result = assert_same(python_module("taskmoe_fairseq.extract", "--checkpoint", str(tmp_path / "none.pt"),
                                       "--lang-pair", "en-de", "--report-only"))
    assert result.returncode == 2 and result.stderr.startswith("taskmoe_fairseq.extract: error: ")


def test_a_script_exits_as_in_a_fresh_interpreter():
    result = assert_same([sys.executable, BUILD_CORPUS, "--out", "/nonexistent", "--langs", "de,xx"])
    assert result.returncode == 2 and "--langs must be a non-empty subset" in result.stderr


def test_stdin_reaches_the_command():
    result = assert_same([sys.executable, "-m", "json.tool"], stdin='{"texts": ["ein", "zwei"]}')
    assert result.returncode == 0 and result.stdout == '{\n    "texts": [\n        "ein",\n        "zwei"\n    ]\n}\n'


# what differs from run to run in fairseq's log lines: clock times, durations and speeds
TIMES = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d+:\d\d:\d\d\.\d+|[\d.]+ ?(?:seconds|s)\b|"
                   r"\b(?:wps|ups|wall|train_wall|sentences/s|tokens/s)[ =][\d.]+|[\d.]+ (?:sentences|tokens)/s")


def test_fairseq_commands_log_as_in_a_fresh_interpreter(trained, data_dir, tmp_path):
    """fairseq-generate configures logging after importing fairseq (fairseq's format, on stderr, with
    its import-time line about tensorboardX), fairseq-train before (its own format, on stdout)."""
    commands = {
        "generate": generate_command(data_dir, trained.get("token", "target"), "en-de", 1),
        "train": train_command(data_dir, str(tmp_path / "save"), "token", "target", 1, ("--no-save", "--disable-validation")),
    }
    for name, command in commands.items():
        fresh, forked = run(command), run_warm(command)
        for stream in ("stdout", "stderr"):
            assert TIMES.sub("T", getattr(forked, stream)) == TIMES.sub("T", getattr(fresh, stream)), (name, stream)
        log = fresh.stderr if name == "generate" else fresh.stdout
        assert "Please install tensorboardX" in log, name  # logged while fairseq is imported
        assert ("| INFO | fairseq_cli.train |" in log) == (name == "train"), name
