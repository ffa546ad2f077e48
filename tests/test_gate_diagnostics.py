"""examples/measure_gates.py and report_gates.py (issue #12's task-gate diagnostics) on a real
checkpoint and a copy whose German gate row was changed by hand: the change found is the one made."""

import os
import sys

import pytest
import torch

from taskmoe_fairseq.errors import run_cli
from taskmoe_fairseq.safe_loading import safe_torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
import measure_gates  # noqa: E402
import report_gates  # noqa: E402

KEY = "encoder.moe_router.gates.decoder_1.task_logits"


@pytest.fixture(scope="module")
def series(trained, tmp_path_factory):
    """The token/target fixture checkpoint, and a copy 10 updates 'later' whose German target row
    puts its two chosen experts last (so German's top-2 set must change and nothing else's)."""
    first = trained.get("token", "target")
    state = safe_torch_load(first)
    langs = list(state["cfg"]["model"].langs)
    de = langs.index("de")
    logits = state["model"][KEY].clone()
    chosen = logits[de].topk(2).indices
    logits[de, chosen] = logits[de].min() - 1.0
    state["model"][KEY] = logits
    state["optimizer_history"][-1]["num_updates"] += 10
    later = str(tmp_path_factory.mktemp("gates") / "later.pt")
    torch.save(state, later)
    out = str(tmp_path_factory.mktemp("gates") / "gates.json")
    assert measure_gates.main(["--name", "fixture", "--out", out, later, first]) == 0
    pairs = state["cfg"]["model"].lang_pairs
    targets = {pair.split("-")[1] for pair in (pairs.split(",") if isinstance(pairs, str) else pairs)}
    return out, sorted(chosen.tolist()), targets


def test_measure_finds_the_changed_task_and_only_it(series):
    import json

    out, chosen, targets = series
    record = json.load(open(out))
    first, later = record["series"]  # sorted by updates, whatever the order given
    assert later["updates"] == first["updates"] + 10
    assert first["layers"]["decoder_1"]["tasks"]["de"]["experts"] == chosen
    assert record["changes"]["decoder_1"][0]["set_changed"] == ["de"]
    tasks = first["layers"]["decoder_1"]["tasks"]
    assert set(tasks) == targets and len(targets) > 2  # the target languages the fixture trains
    for entry in tasks.values():
        assert abs(sum(entry["probs"]) - 1) < 1e-4 and entry["top1_prob"] == pytest.approx(max(entry["probs"]), abs=1e-6)
    overlap = record["overlap_at_last"]["decoder_1"]
    assert len(overlap["shared"]) == len(targets) * (len(targets) - 1) // 2 and all(0 <= n <= 2 for n in overlap["shared"].values())


def test_report_renders_every_checkpoint_and_the_change(series, tmp_path):
    out, _, targets = series
    md = tmp_path / "gates.md"
    assert report_gates.main([out, "--out", str(md)]) == 0
    text = md.read_text()
    assert "## fixture" in text and "### decoder_1 (target routing, E = 4, k = 2)" in text
    assert f"set 1/{len(targets)} (de)" in text


def test_a_checkpoint_without_task_gates_is_one_line(trained, tmp_path, capsys):
    token_token = trained.get("token", "token", 1)
    # the script's entry point (``sys.exit(run_cli("measure_gates", main))``) in this process
    status = run_cli("measure_gates", measure_gates.main, ["--out", str(tmp_path / "x.json"), token_token])
    stderr = capsys.readouterr().err
    assert status == 2
    assert stderr.strip().splitlines()[-1].startswith("measure_gates: error: ")
    assert "has no task-routed MoE layer" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x.json").exists()
