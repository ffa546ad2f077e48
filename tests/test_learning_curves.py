"""examples/learning_curves.py (the routing comparison along training) and its report: the
recipes differ from the quickstart's only in the routing, the bootstrap intervals and differences
come out of the hypotheses, only points every configuration reached are compared, and the report
is made from the JSON alone."""

import json
import os
import sys
from types import SimpleNamespace

import pytest

from cli_helpers import REPO

sys.path[:0] = [os.path.join(REPO, "examples")]
import learning_curves  # noqa: E402
import quickstart  # noqa: E402
import report_learning_curves  # noqa: E402
from quickstart_recipe import split_options  # noqa: E402

SENTENCES = [
    "The file is saved in the folder you choose.",
    "Click the button to open the dialog.",
    "Select the cells you want to format.",
    "The changes are applied to every page.",
    "Press Enter to confirm the entry.",
    "Choose a colour from the list below.",
]


def test_recipes_differ_from_the_quickstarts_only_in_routing():
    base = dict((o[0], o[1:]) for o in split_options(quickstart.RECIPE))
    for name in learning_curves.CURVE_CONFIGS:
        options = dict((o[0], o[1:]) for o in split_options(learning_curves.recipe(name)))
        changed = {key for key in set(base) | set(options) if base.get(key) != options.get(key)}
        allowed = {"--encoder-moe-routing", "--decoder-moe-routing", "--moe-expert-count"}
        assert changed <= allowed | ({"--moe-task-gate-init", "--moe-upcycle"} if name in learning_curves.REMEDIES else set()), name
    warm = dict((o[0], o[1:]) for o in split_options(learning_curves.recipe("token/target+static-init")))
    assert warm["--moe-task-gate-init"] == ["static"]  # the remedy differs from plain token/target in that alone
    dense = dict((o[0], o[1:]) for o in split_options(learning_curves.recipe("dense")))
    assert dense["--moe-expert-count"] == ["2"] and dense["--decoder-moe-routing"] == ["static-target"]
    assert learning_curves.recipe("token/target") == quickstart.RECIPE  # the quickstart's own routing


def write_test_sets(root):
    raw = os.path.join(root, "raw")
    os.makedirs(raw)
    for xx in quickstart.XX:
        for lang in ("en", xx):  # the same sentences on both sides: scoring only needs the text
            with open(os.path.join(raw, f"test.en-{xx}.{lang}"), "w", encoding="utf-8") as stream:
                stream.write("".join(f"{s} ({lang})\n" for s in SENTENCES))
    return root


def point(data, updates, good):
    """A cached point whose hypotheses are the references (``good``) or a fixed wrong sentence."""
    refs = learning_curves.references(data, len(SENTENCES))
    hypotheses = {pair: list(refs[pair]) if good else ["no no no"] * len(SENTENCES) for pair in quickstart.PAIRS}
    from scoring import score

    return {"updates": updates, "hypotheses": hypotheses,
            "scores": {pair: score(hypotheses[pair], refs[pair], pair.split("-")[1]) for pair in quickstart.PAIRS}}


def test_intervals_and_differences_come_from_the_hypotheses_at_common_points(tmp_path):
    data = write_test_sets(str(tmp_path))
    options = SimpleNamespace(data=data, test_lines=len(SENTENCES))
    points_of = {
        "dense": {400: point(data, 400, False), 800: point(data, 800, False)},
        "token/target": {400: point(data, 400, True), 800: point(data, 800, True), 1200: point(data, 1200, True)},
    }
    summary = learning_curves.summarise(options, points_of, samples=100)
    assert summary["baseline"] == "dense" and summary["points"] == [400, 800]  # 1200: dense never got there
    good, bad = summary["configs"]["token/target"]["800"], summary["configs"]["dense"]["800"]
    assert good["chrf_avg"] == pytest.approx(100) and good["chrf_avg_ci95"] == pytest.approx([100, 100])
    assert bad["chrf_avg"] < 20 and "chrf_minus_dense" not in bad
    assert good["chrf_minus_dense"] == pytest.approx(100 - bad["chrf_avg"])
    low, high = good["chrf_minus_dense_ci95"]
    assert 0 < low <= good["chrf_minus_dense"] <= high
    assert good["bleu_avg"] == pytest.approx(100) and good["per_direction"]["en-ja"]["chrf"] == pytest.approx(100)

    result = {"command": "python examples/learning_curves.py ...", "date": "2026-12-02 13:00 UTC", "hardware": "test",
              "jobs": 2, "threads_per_job": 1, "wall_seconds": 60, "train_seconds": {"dense": 600, "token/target": 660}, "options": {"updates": 1200, "points": 3, "beam": 1,
              "test_lines": len(SENTENCES)}, "signatures": {"bleu": {"13a": "BLEU-sig"}, "chrf": "chrF-sig"}, **summary}
    path = tmp_path / "out" / "learning_curves.json"
    path.parent.mkdir()
    path.write_text(json.dumps(result))
    report_learning_curves.main([str(path)])
    text = (path.parent / "learning_curves.md").read_text()
    assert "| token/target | 800 | 100.0 [100.0, 100.0] |" in text and "training 10-11 min per configuration" in text
    assert "* 800 updates: token/target (100.0) > dense" in text
    assert (path.parent / "learning_curves.png").stat().st_size > 10_000


def test_report_of_a_measurement_without_common_points_is_one_line(tmp_path):
    path = tmp_path / "learning_curves.json"
    path.write_text(json.dumps({"points": []}))
    with pytest.raises(SystemExit) as stop:
        report_learning_curves.main([str(path)])
    assert "has no point that every configuration reached" in str(stop.value)
    with pytest.raises(SystemExit) as stop:
        report_learning_curves.main([str(tmp_path / "missing.json")])
    assert str(stop.value).startswith("report_learning_curves: cannot read")


def test_a_remedy_is_compared_with_its_plain_gate(tmp_path):
    data = write_test_sets(str(tmp_path))
    options = SimpleNamespace(data=data, test_lines=len(SENTENCES))
    points_of = {"token/target": {300: point(data, 300, False)},
                 "token/target+static-init": {300: point(data, 300, True)}}
    summary = learning_curves.summarise(options, points_of, samples=50)
    row = summary["remedies"]["token/target+static-init"]["points"]["300"]
    assert summary["remedies"]["token/target+static-init"]["against"] == "token/target"
    assert row["chrf_minus_plain"] > 80 and row["chrf_minus_plain_ci95"][0] > 80
    lines = report_learning_curves.remedies({"points": [300], **summary})
    assert lines[0] == "token/target+static-init against token/target (same resamples):"


def test_an_upcycled_run_is_a_dense_stage_then_the_moe_model_under_the_same_budget(tmp_path, monkeypatch):
    """token/target+upcycle: fairseq-train without MoE layers for the first point's updates, then
    token/target from its checkpoint with --moe-upcycle for the rest; its points count the updates
    of both stages."""
    calls = []

    def fake_train(data, save_dir, recipe, updates, **kwargs):
        calls.append((save_dir, recipe, updates, kwargs["save_every"]))
        return os.path.join(save_dir, "checkpoint_last.pt")

    monkeypatch.setattr(quickstart, "train", fake_train)
    options = SimpleNamespace(data="DATA", updates=600, points=4, seed=1)
    save_dir = str(tmp_path / "token-target+upcycle")
    learning_curves.train_upcycled(options, "token/target+upcycle", save_dir, env={})
    (dense_dir, dense_recipe, dense_updates, dense_every), (moe_dir, moe_recipe, moe_updates, moe_every) = calls
    assert (dense_dir, dense_updates, dense_every) == (save_dir + "-dense", 150, 150)
    assert dense_recipe == learning_curves.apply_overrides(quickstart.RECIPE, learning_curves.NO_MOE)
    assert (moe_dir, moe_updates, moe_every) == (save_dir, 450, 150)
    assert moe_recipe == learning_curves.recipe("token/target+upcycle") + [
        "--finetune-from-model", os.path.join(save_dir + "-dense", "checkpoint_last.pt")]
    assert "--moe-upcycle" in moe_recipe and "--moe-upcycle" not in dense_recipe
    for folder, updates in ((save_dir + "-dense", 150), (save_dir, 150), (save_dir, 300), (save_dir, 450)):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"checkpoint_1_{updates}.pt"), "w").close()
    found = learning_curves.run_checkpoints(save_dir, "token/target+upcycle", options)
    assert {updates: os.path.relpath(path, tmp_path) for updates, path in found.items()} == {
        150: "token-target+upcycle-dense/checkpoint_1_150.pt", 300: "token-target+upcycle/checkpoint_1_150.pt",
        450: "token-target+upcycle/checkpoint_1_300.pt", 600: "token-target+upcycle/checkpoint_1_450.pt"}
