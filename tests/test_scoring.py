"""examples/scoring.py (the example scripts' sacrebleu metrics, signatures and fairseq-generate
results files), the quickstart's degenerate-output warnings and the recipe runner's option
overrides."""

import os
import sys

import pytest
import sacrebleu
import sentencepiece

from cli_helpers import REPO, generate_command, parse_generation, run_in_process

sys.path[:0] = [os.path.join(REPO, "examples")]
import quickstart  # noqa: E402
import quickstart_recipe  # noqa: E402
import scoring  # noqa: E402


def test_scores_are_sacrebleus_with_the_tokenizer_of_the_target_language():
    hypotheses = ["猫は座った。", "今日は晴れです。"]
    references = ["猫が座った。", "今日は晴れ。"]
    for lang, tokenize in (("ja", "char"), ("zh", "zh"), ("de", "13a")):
        result = scoring.score(hypotheses, references, lang)
        assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize).score)
        assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
        assert f"tok:{tokenize}" in result["bleu_signature"]
        assert f"version:{sacrebleu.__version__}" in result["bleu_signature"]
        assert result["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")
    # one BLEU signature per tokenizer, not per language
    sig = scoring.signatures(["de", "fr", "ja", "zh", "en"])
    assert sorted(sig["bleu"]) == ["13a", "char", "zh"]
    lines = scoring.signature_lines(lang for lang in ["de", "fr", "ja", "zh", "en"])
    assert lines[0].startswith("BLEU (de, en, fr): `nrefs:1") and lines[-1].startswith("chrF (all): `")


def test_generate_results_file_gives_sentencepiece_decoded_hypotheses(data_dir, trained, tmp_path):
    """fairseq-generate's own results file (--results-path, --bpe sentencepiece) holds, for every
    sentence, exactly what SentencePiece decodes (byte fallback included) from the pieces of its
    H- line; the speed is in the process's log."""
    checkpoint = trained.get("token", "target")
    results = str(tmp_path / "gen")
    command = generate_command(data_dir, checkpoint, "en-ru", beam=2)
    result = run_in_process(command + scoring.generate_args(os.path.join(data_dir, "spm.model"), results))
    with open(os.path.join(results, "generate-test.txt"), encoding="utf-8") as lines:
        pieces = parse_generation(lines.read())
    hypotheses = scoring.read_hypotheses(results, "test", expected=len(pieces))
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data_dir, "spm.model"))
    assert len(hypotheses) == 24
    assert hypotheses == [processor.decode(pieces[i][0].split()) for i in range(len(pieces))]
    assert scoring.generation_speed(result.stdout + result.stderr) > 0
    with pytest.raises(ValueError, match="expected ids 0..99"):
        scoring.read_hypotheses(results, "test", expected=100)


def test_degenerate_output_is_named():
    assert scoring.degeneracy(["Hallo Welt."] * 8 + ["a", "b"])["most_common_share"] == pytest.approx(0.8)
    assert scoring.degeneracy(["die die die die Datei", "ok so"])["repeating_share"] == pytest.approx(0.5)
    assert scoring.degeneracy(["表表表表表表表表表表表表", "普通的句子。"])["repeating_share"] == pytest.approx(0.5)
    assert scoring.degeneracy(["", "x"])["empty_share"] == pytest.approx(0.5)
    good = [{"pair": "en-de", "chrf_full": 35.0}, {"pair": "de-en", "chrf_full": 40.0}]
    assert quickstart.degenerate_warnings(good, {"en-de": ["Ein Satz.", "Zwei."], "de-en": ["One.", "Two."]}) == []
    bad = [{"pair": "en-de", "chrf_full": 4.0}, {"pair": "de-en", "chrf_full": 12.0}]
    warnings = quickstart.degenerate_warnings(bad, {"en-de": ["die die die die"] * 3, "de-en": ["The."] * 3})
    assert warnings[0].startswith("average chrF 8.0 < 10")
    assert any("en-de: chrF 4.0" in w for w in warnings)
    assert any("de-en: 100% of the hypotheses are one and the same" in w for w in warnings)
    assert any("en-de: 100% of the hypotheses repeat" in w for w in warnings)


def test_recipe_overrides():
    base = ["--arch", "small", "--share-all-embeddings", "--lr", "3e-3", "--adam-betas", "(0.9,0.98)"]
    assert quickstart_recipe.apply_overrides(base, ["--lr", "5e-3", "--no-share-all-embeddings", "--dropout", "0"]) == [
        "--arch", "small", "--lr", "5e-3", "--adam-betas", "(0.9,0.98)", "--dropout", "0"]
    assert quickstart_recipe.apply_overrides(base, []) == base


def test_recipe_records_name_their_data_and_compare_batch_sizes_by_tokens(tmp_path, capsys):
    """A record says what it trained on (the binarization's line counts, the slice's
    make_bundled.py options) and the report puts recipes of different --max-tokens side by side
    by updates x max-tokens; records from before the data field are the bundled 4,000-pair slice,
    and those from before the lenpen field were decoded at fairseq's default length penalty."""
    import json

    raw = tmp_path / "slice" / "raw"
    raw.mkdir(parents=True)
    (tmp_path / "slice" / "manifest.json").write_text(json.dumps({"options": "--train-per-lang 16000 --max-chars 200"}))
    data = tmp_path / "bin"
    data.mkdir()
    (data / "binarize.json").write_text(json.dumps({
        "command": "binarize.py ...", "settings": {"raw": str(raw), "vocab_size": 4000},
        "lines": {"en-de": {"train": 16000}, "en-ja": {"train": 15000}}}))
    summary = quickstart_recipe.data_summary(str(data))
    assert summary["vocab_size"] == 4000 and summary["slice_options"].endswith("--max-chars 200")
    assert quickstart_recipe.data_summary(str(tmp_path / "missing")) == {"path": str(tmp_path / "missing")}
    recipe = ["--max-tokens", "4096", "--lr", "5e-3", "--max-tokens", "1024"]  # the last one counts, as in argparse
    assert quickstart_recipe.max_tokens(recipe) == 1024
    record = {"name": "r", "overrides": [], "recipe": recipe, "updates": 2000, "chrf_avg": 20.0, "bleu_avg": 5.0,
              "seconds_per_update": float("nan")}
    (tmp_path / "new.json").write_text(json.dumps(dict(record, data=summary, lenpen=1.5)))
    (tmp_path / "old.json").write_text(json.dumps(dict(record, recipe=["--max-tokens", "4096"])))
    quickstart_recipe.report([str(tmp_path / "new.json"), str(tmp_path / "old.json")])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows[0].startswith("| r | 15,000 (<= 200 characters) | `(results.md recipe)` | 2000 | 2.0 | 20.0 |")
    assert rows[1].startswith("| r | 4,000 (<= 100 characters) | `(results.md recipe)` | 2000 | 8.2 | 20.0 |")
    # the length penalty they were decoded with; records from before the field were at fairseq's 1.0
    assert rows[0].endswith("| — | 1.5 |") and rows[1].endswith("| — | 1.0 |")


def test_training_progress_counts_only_this_processs_updates_after_a_resume():
    """A resumed fairseq-train restarts its ``wall`` but not ``num_updates``: the time left comes
    from the updates this process made (it printed "about 0:00 left" at 1,350 of 2,400 before)."""
    clock = quickstart.TrainingClock(now=1000.0)
    clock.see("INFO | fairseq.trainer | Loaded checkpoint runs/x/checkpoint_last.pt (epoch 5 @ 1231 updates)")
    assert clock.resumed_at == 1231
    assert clock.progress(1331, 2400, now=1100.0) == "elapsed 1:40, about 17:49 left"  # 1 s per update
    fresh = quickstart.TrainingClock(now=0.0)
    assert fresh.progress(50, 1000, now=25.0) == "elapsed 0:25, about 7:55 left"
    line = ("epoch 001:     50 / 243 loss=10.9, nll_loss=10.8, wps=3414.6, ups=1.1, wall=0, train_wall=40, "
            "num_updates=50 | INFO | train_inner")
    assert quickstart.progress_line(line, 1000, fresh).startswith("update 50/1000: loss 10.9, 3414.6 words/s, elapsed ")


def test_resampled_scores_recompute_sacrebleus_corpus_score_from_sentence_statistics():
    """The paired bootstrap's one home (paper_table1.py, learning_curves.py): a resample's score is
    sacrebleu's corpus score of the sentences it draws, repeats included (a permutation of every
    sentence is the corpus score itself)."""
    import numpy as np

    hyps = ["Der Hund schläft.", "Ein rotes Haus steht dort.", "Klicken Sie auf OK."]
    refs = ["Der Hund schläft.", "Dort steht ein rotes Haus.", "Klicken Sie auf Abbrechen."]
    draws = np.array([[2, 0, 1], [0, 0, 0], [2, 2, 1]])
    for metric in (scoring.bleu_metric("de"), scoring.chrf_metric()):
        stats = scoring.sentence_statistics(metric, hyps, refs)
        assert stats.shape[0] == len(hyps)
        scores = scoring.resampled_scores(metric, stats, draws)
        expected = [metric.corpus_score([hyps[i] for i in draw], [[refs[i] for i in draw]]).score for draw in draws]
        assert scores.tolist() == pytest.approx(expected)
        assert scores[0] == pytest.approx(metric.corpus_score(hyps, [refs]).score) and scores[1] == pytest.approx(100)
        assert scores[2] < scores[1]


def test_recipe_record_counts_a_resumed_runs_own_updates_and_is_never_overwritten(tmp_path, monkeypatch):
    """A candidate continued from its ``checkpoint_last.pt`` (800 of 1,231 updates done) divides its
    training time by the 431 updates it made; decoding the finished run again (another --lenpen)
    without --tag would replace the training's record: refused with one line."""
    import argparse
    import json

    import torch

    data = tmp_path / "bin"
    (data / "raw").mkdir(parents=True)
    for xx in quickstart.XX:
        for lang in ("en", xx):
            (data / "raw" / f"test.en-{xx}.{lang}").write_text("Ein Satz.\nNoch einer hier.\n", encoding="utf-8")
    save_dir = tmp_path / "work" / "run"
    save_dir.mkdir(parents=True)
    torch.save({"optimizer_history": [{"num_updates": 800}]}, save_dir / "checkpoint_last.pt")
    assert quickstart_recipe.updates_done(str(save_dir)) == 800 and quickstart_recipe.updates_done(str(tmp_path)) == 0

    def fake_train(data_dir, run_dir, recipe, updates, seed, save_every=None):
        (save_dir / "done").write_bytes(b"")
        return str(save_dir / "checkpoint_last.pt")

    monkeypatch.setattr(quickstart, "train", fake_train)
    monkeypatch.setattr(quickstart_recipe, "translate_in_process", lambda data_dir, checkpoint, lenpen, split: {
        pair: quickstart.test_references(data_dir, pair, split) for pair in quickstart.PAIRS})
    options = argparse.Namespace(data=str(data), workdir=str(tmp_path / "work"), name="run", updates=1231, seed=1,
                                 save_every=None, evaluate_at=None, in_process=True, tag=None, split="test", lenpen=2.0)
    quickstart_recipe.measure(options, [])
    record = json.loads((tmp_path / "work" / "run.json").read_text())
    assert record["resumed_from"] == 800
    assert record["seconds_per_update"] == pytest.approx(record["train_seconds"] / 431)
    assert record["chrf_avg"] == pytest.approx(100) and record["rows"]["en-de"]["length_ratio"] == 1.0
    with pytest.raises(SystemExit, match="run.json exists; pass --tag"):
        quickstart_recipe.measure(options, [])
    options.tag = "lenpen1.0"
    quickstart_recipe.measure(options, [])  # the finished run decoded again: a second record, no training time
    again = json.loads((tmp_path / "work" / "run-lenpen1.0.json").read_text())
    assert again["resumed_from"] == 0 and again["train_seconds"] != again["train_seconds"]  # NaN
