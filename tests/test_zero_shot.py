"""Zero-shot pairs the routing defines: on a model trained on en<->xx only, de-fr has task ids
under source/target routing (de was trained as a source, fr as a target), so it extracts and
translates; under pair routing its gate never saw de-fr, so it stops with one line. (The commands'
entry points run in this process: cli_helpers.run_in_process.)"""

import os

from cli_helpers import TASK_ARGS, python_module, run_in_process

SOURCE_LINES = ["▁Klicken ▁Sie ▁auf ▁OK .", "▁Die ▁Datei ▁wurde ▁gespeichert ."]


def interactive(data_dir, checkpoint, check=True):
    command = ["fairseq-interactive", data_dir, *TASK_ARGS, "--source-lang", "de", "--target-lang", "fr",
               "--path", checkpoint, "--beam", "4", "--max-len-b", "20", "--cpu"]
    return run_in_process(command, stdin="\n".join(SOURCE_LINES) + "\n", check=check)


def hypotheses(result):
    return [line.split("\t")[2] for line in result.stdout.splitlines() if line.startswith("H-")]


def test_zero_shot_pair_extracts_and_translates_like_the_full_model(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    out = str(tmp_path / "de-fr.pt")
    result = run_in_process(python_module("taskmoe_fairseq.extract", "--checkpoint", full, "--lang-pair", "de-fr", "--output", out))
    assert "de-fr is zero-shot" in result.stderr and os.path.exists(out)
    full_run = interactive(data_dir, full)
    assert "de-fr is zero-shot" in full_run.stderr
    want = hypotheses(full_run)
    assert len(want) == 2
    assert hypotheses(interactive(data_dir, out)) == want


def test_pair_routing_refuses_a_zero_shot_pair_with_one_line(trained, data_dir, tmp_path):
    full = trained.get("pair", "pair", 2)
    result = run_in_process(python_module("taskmoe_fairseq.extract", "--checkpoint", full, "--lang-pair", "de-fr",
                               "--output", str(tmp_path / "x.pt")), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "route by language pair: their gate never saw de-fr" in result.stderr
    assert not os.path.exists(tmp_path / "x.pt")
    result = interactive(data_dir, full, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "this model routes by language pair: its gate never saw de-fr" in result.stderr
