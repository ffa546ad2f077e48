"""Extracted checkpoints are self-contained (issue 31): extract copies the model's dictionaries
and spm.model beside its output (fairseq's hub-archive convention), and translate, serve and the
hub find them there once the training data folder is deleted and the output folder moved.

The model is the 300-update target/target one (varied outputs, shared with test_translate and
test_serve), saved again with its recorded data folder (``cfg.task.data``) pointing at a copy of
the data that the test then deletes: a training run whose data is gone."""

import os
import shutil

import pytest
import torch

from cli_helpers import raw_lines, run_main
from taskmoe_fairseq import translate
from taskmoe_fairseq.extract import assets
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel
from taskmoe_fairseq.serve.service import TranslationService
from taskmoe_fairseq.serve.shared_weights import SharedWeights

UPDATES = 300
BEAM, MAX_LEN = 4, 30
DATA_FILES = ["dict.en.txt", "dict.de.txt", "dict.fr.txt", "dict.ru.txt", "spm.model"]


def extract(*args):
    return run_main("taskmoe_fairseq.extract", *args, check=False)


@pytest.fixture(scope="module")
def gone(trained, data_dir, tmp_path_factory):
    """(full checkpoint whose data folder is deleted, moved folder of its extracted en-de and de-en,
    reference translations {pair: lines} from the intact model)."""
    root = tmp_path_factory.mktemp("assets")
    data = root / "data"
    os.makedirs(data)
    for name in os.listdir(data_dir):
        if name.startswith("dict.") or name == "spm.model":
            shutil.copy(os.path.join(data_dir, name), data / name)
    original = trained.get("target", "target", UPDATES)
    state = torch.load(original, map_location="cpu", weights_only=False)
    state["cfg"]["task"].data = state["cfg"]["model"].data = str(data)
    os.makedirs(root / "train")
    full = str(root / "train" / "checkpoint_last.pt")
    torch.save(state, full)

    lines = {pair: raw_lines(data_dir, pair)[:8] for pair in ("en-de", "de-en")}
    want = {pair: translate.translate_lines(translate.load_translator(original, pair, data_dir=data_dir), lines[pair],
                                            beam=BEAM, max_len_b=MAX_LEN) for pair in lines}
    assert all(len(set(texts)) >= 3 for texts in want.values())  # varied: a comparison that can fail

    out = str(root / "serve")
    result = extract("--checkpoint", full, "--lang-pair", "en-de", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    # a second run into the same folder: the same data files already there are fine without --force
    result = extract("--checkpoint", full, "--lang-pair", "de-en", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == sorted(DATA_FILES + ["en-de.pt", "en-de.report.json", "de-en.pt", "de-en.report.json"])
    for name in DATA_FILES:
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(data_dir, name), "rb").read(), name

    shutil.rmtree(data)
    moved = str(root / "moved")
    shutil.move(out, moved)
    return full, moved, lines, want


def test_translate_works_from_the_moved_folder_alone(gone):
    _, moved, lines, want = gone
    for pair in ("en-de", "de-en"):
        translator = translate.load_translator(os.path.join(moved, f"{pair}.pt"), pair)
        assert translate.translate_lines(translator, lines[pair], beam=BEAM, max_len_b=MAX_LEN) == want[pair], pair


def test_serve_works_from_the_moved_folder_alone(gone):
    _, moved, lines, want = gone
    weights = SharedWeights(os.path.join(moved, "en-de.pt"))
    assert weights.data_dir == moved and weights.spm_model == os.path.join(moved, "spm.model")
    assert TranslationService(weights).translate("en-de", lines["en-de"], BEAM, MAX_LEN) == want["en-de"]


def test_hub_loads_from_the_moved_folder_with_fairseq_defaults(gone, trained, data_dir):
    _, moved, lines, _ = gone
    hub = TaskMoeTransformerModel.from_pretrained(moved, checkpoint_file="de-en.pt", source_lang="de", target_lang="en",
                                                  bpe="sentencepiece", cpu=True)
    original = trained.get("target", "target", UPDATES)
    reference = TaskMoeTransformerModel.from_pretrained(
        os.path.dirname(original), checkpoint_file=os.path.basename(original), data_name_or_path=data_dir,
        source_lang="de", target_lang="en", bpe="sentencepiece", sentencepiece_model=os.path.join(data_dir, "spm.model"),
        cpu=True,
    )
    assert hub.translate(lines["de-en"], beam=BEAM) == reference.translate(lines["de-en"], beam=BEAM)


def test_export_works_from_the_moved_folder_alone(gone, tmp_path):
    _, moved, lines, want = gone
    folder = str(tmp_path / "ct2-en-de")
    result = run_main("taskmoe_fairseq.export", "--checkpoint", os.path.join(moved, "en-de.pt"), "--lang-pair", "en-de",
                      "--format", "ctranslate2", "--output-dir", folder, check=False)
    assert result.returncode == 0, result.stderr
    translator = translate.load_translator(folder, "en-de")
    assert translate.translate_lines(translator, lines["en-de"], beam=BEAM, max_len_b=MAX_LEN) == want["en-de"]


def test_a_full_checkpoint_without_its_data_folder_is_one_line(gone, data_dir, tmp_path):
    full, moved, lines, want = gone
    with pytest.raises(TaskMoeError, match=r"data folder .* not found and .* lacks the dictionaries .*pass --data-dir"):
        translate.load_translator(full, "en-de")
    with pytest.raises(TaskMoeError, match="pass --data-dir"):
        SharedWeights(full)
    result = extract("--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"))
    assert result.returncode == 2 and "pass --data-dir" in result.stderr and len(result.stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == []  # nothing half-written
    # --data-dir points extract at a data folder (here the moved extraction's own files)
    result = extract("--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"), "--data-dir", moved)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(DATA_FILES + ["en-de.pt", "en-de.report.json"])
    translator = translate.load_translator(str(tmp_path / "en-de.pt"), "en-de")
    assert translate.translate_lines(translator, lines["en-de"], beam=BEAM, max_len_b=MAX_LEN) == want["en-de"]


def test_a_different_data_file_beside_the_output_is_never_replaced(gone, tmp_path):
    """A dictionary or spm.model of other content beside the output (the user's, another data
    folder's) is refused, --force or not: --force replaced them silently (a tester's finding). An
    output that is a file of the data folder extract reads is refused too."""
    full, moved, _, _ = gone
    out = tmp_path / "out"
    shutil.copytree(moved, out)
    dictionary = out / "dict.en.txt"
    dictionary.write_text("mine 1\n", encoding="utf-8")
    for force in ((), ("--force",)):
        result = extract("--checkpoint", full, "--lang-pair", "en-fr", "--output-dir", str(out), "--data-dir", moved, *force)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "dict.en.txt exists with other content than the model's dict.en.txt; extract never replaces" in result.stderr
        assert not (out / "en-fr.pt").exists() and dictionary.read_text(encoding="utf-8") == "mine 1\n"
    dictionary.unlink()
    (out / "dict.de.txt").unlink()
    os.makedirs(out / "dict.de.txt")  # not a file: refused even with --force
    result = extract("--checkpoint", full, "--lang-pair", "en-fr", "--output-dir", str(out), "--data-dir", moved, "--force")
    assert result.returncode == 2 and "dict.de.txt exists and is not a regular file" in result.stderr
    assert not (out / "en-fr.pt").exists()
    os.rmdir(out / "dict.de.txt")
    result = extract("--checkpoint", full, "--lang-pair", "en-fr", "--output-dir", str(out), "--data-dir", moved, "--force")
    assert result.returncode == 0, result.stderr
    assert dictionary.read_bytes() == open(os.path.join(moved, "dict.en.txt"), "rb").read()
    data = tmp_path / "data"  # the data folder's own files are inputs
    shutil.copytree(moved, data)
    before = {name: (data / name).read_bytes() for name in os.listdir(data)}
    for name in ("dict.en.txt", "spm.model"):
        result = extract("--checkpoint", full, "--lang-pair", "en-de", "--data-dir", str(data),
                         "--output", str(data / name), "--force")
        assert result.returncode == 2 and "is a file of the data folder" in result.stderr, result.stderr
    assert {name: (data / name).read_bytes() for name in os.listdir(data)} == before


def test_model_languages_and_lookup_order(tmp_path):
    from argparse import Namespace

    args = Namespace(lang_pairs="de-fr,fr-de,de-en", taskmoe_langs=["en", "de", "fr", "es"])
    assert assets.model_languages(args) == (["de", "fr", "en"], ["es"])
    recorded, beside, given = tmp_path / "recorded", tmp_path / "ckpt", tmp_path / "given"
    for folder in (recorded, beside, given):
        os.makedirs(folder)
    state = {"cfg": {"task": Namespace(data=f"{recorded}{os.pathsep}/elsewhere/shard1"), "model": Namespace(data="/old")}}
    assert assets.recorded_data_dir(state) == str(recorded)  # cfg.task first; fairseq's sharded paths: the first
    assert assets.recorded_data_dir({"args": Namespace(data=str(given))}) == str(given)  # a legacy checkpoint
    checkpoint = str(beside / "de-fr.pt")
    assert assets.data_dir_for(checkpoint, str(recorded), ["de", "fr"]) == str(recorded)
    for lang in ("de", "fr"):
        (beside / f"dict.{lang}.txt").write_text("x 1\n")
    assert assets.data_dir_for(checkpoint, str(recorded), ["de", "fr"]) == str(beside)
    assert assets.data_dir_for(checkpoint, str(recorded), ["de", "fr"], data_dir=str(given)) == str(given)


def test_training_records_the_data_folder_as_an_absolute_path(data_dir, tmp_path, monkeypatch):
    """A relative data folder was recorded as given: translate, serve and extract run from another
    folder then found nothing there, or another dataset of the same name (a tester's finding)."""
    from cli_helpers import train_command, train_in_process
    from taskmoe_fairseq.safe_loading import safe_torch_load

    monkeypatch.chdir(os.path.dirname(data_dir))
    save_dir = str(tmp_path / "ckpt")
    train_in_process(train_command(os.path.basename(data_dir), save_dir, "target", "target", 1))
    recorded = assets.recorded_data_dir(safe_torch_load(os.path.join(save_dir, "checkpoint_last.pt")))
    assert recorded == os.path.abspath(data_dir)


def test_dictionaries_that_do_not_fit_the_checkpoint_are_one_line(gone, tmp_path):
    """Another model's dictionaries beside an extracted checkpoint: translate printed a size-mismatch
    traceback, the server started, said ok and answered 500 to every request (a tester's finding)."""
    _, folder, _, _ = gone
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    for name in os.listdir(wrong):
        if name.startswith("dict."):
            lines = (wrong / name).read_text(encoding="utf-8").splitlines()
            (wrong / name).write_text("\n".join(lines[: len(lines) // 2]) + "\n", encoding="utf-8")
    checkpoint = str(wrong / "en-de.pt")
    with pytest.raises(TaskMoeError, match="does not fit the dictionaries in .*; pass the --data-dir the model was trained on"):
        translate.load_translator(checkpoint, "en-de")
    with pytest.raises(TaskMoeError, match="does not fit the dictionaries in .*: .* in the checkpoint"):
        SharedWeights(checkpoint)
