"""tests/forked_cli.py (``cli_helpers.run_warm``) gives what a fresh interpreter gives: the same
exit status, stdout and stderr, for a ``-m`` module and a script, with stdin passed through
(the one-line errors of the plugin's commands included)."""

import os
import sys

from cli_helpers import REPO, python_module, run, run_warm

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
