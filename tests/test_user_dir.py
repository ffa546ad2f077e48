"""``--user-dir`` from outside the clone (issue 31): after ``pip install -e .`` fairseq finds
``--user-dir taskmoe_fairseq`` only relative to the working folder or beside its own package, so
from another folder it stops with a FileNotFoundError before the plugin is imported; the
absolute path printed by ``python -m taskmoe_fairseq.user_dir`` works from any folder. Real
processes: the point is the working folder and a fresh interpreter's import of the plugin."""

import os
import subprocess

import pytest

from cli_helpers import ENV, PLUGIN, TEST_LINES, generate_command, parse_generation, python_module


def run_in(folder, command):
    return subprocess.run(command, env=ENV, cwd=folder, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_printed_user_dir_runs_fairseq_generate_from_another_folder(trained, data_dir, tmp_path):
    printed = run_in(tmp_path, python_module("taskmoe_fairseq.user_dir"))
    assert printed.returncode == 0, printed.stderr[-2000:]
    user_dir = printed.stdout.strip()
    assert os.path.samefile(user_dir, PLUGIN) and os.path.isabs(user_dir)

    command = generate_command(data_dir, trained.get("token", "target"), "en-de", beam=2)
    relative = command.index("--user-dir") + 1
    # the trap: the relative form only works from the clone's root
    command[relative] = "taskmoe_fairseq"
    failed = run_in(tmp_path, command)
    assert failed.returncode != 0 and f"FileNotFoundError: {tmp_path}{os.sep}taskmoe_fairseq" in failed.stderr

    command[relative] = user_dir
    result = run_in(tmp_path, command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(parse_generation(result.stdout)) == TEST_LINES
    assert os.listdir(tmp_path) == []  # nothing written in the working folder
