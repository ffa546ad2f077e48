"""fairseq's hub interface, as a serving process uses it: full and extracted checkpoints
translate raw text (language tag stripped); a wrong pair is an exception the caller can
handle, and the interface keeps working afterwards."""

import os

import pytest

from taskmoe_fairseq import extract
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

SENTENCES = ["Click the button to open the dialog.", "Select the cell range."]


def load(path, data_dir, src="en", tgt="de", **overrides):
    return TaskMoeTransformerModel.from_pretrained(
        os.path.dirname(path), checkpoint_file=os.path.basename(path), data_name_or_path=data_dir,
        source_lang=src, target_lang=tgt, bpe="sentencepiece",
        sentencepiece_model=os.path.join(data_dir, "spm.model"), cpu=True, **overrides,
    )


def test_hub_translates_with_full_and_extracted_checkpoints_and_refuses_other_pairs(trained, data_dir, tmp_path):
    full_path = trained.get("token", "target")
    assert extract.main(["--checkpoint", full_path, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt")]) == 0
    full, extracted = load(full_path, data_dir), load(str(tmp_path / "en-de.pt"), data_dir)
    want = full.translate(SENTENCES, beam=4)
    assert len(want) == 2 and not any("__de__" in text or "▁" in text for text in want)
    assert extracted.translate(SENTENCES, beam=4) == want
    extracted.task.args.source_lang, extracted.task.args.target_lang = "de", "en"
    with pytest.raises(TaskMoeError, match="is the en-de sub-network; it cannot translate de-en"):
        extracted.translate(["Hallo Welt"])
    extracted.task.args.source_lang, extracted.task.args.target_lang = "en", "de"
    assert extracted.translate(SENTENCES, beam=4) == want  # still serving


def test_langs_and_lang_pairs_overrides_take_the_command_lines_comma_form_and_lists(trained, data_dir):
    """``langs="en,de,fr,ru"`` was split into characters (issue 28); a reordered list is refused as
    fairseq-generate refuses it, naming both orders."""
    path = trained.get("token", "target")
    want = load(path, data_dir).translate(SENTENCES, beam=2)
    pairs = "en-de,de-en,en-fr,fr-en,en-ru,ru-en"
    for langs, lang_pairs in (("en,de,fr,ru", pairs), (["en", "de", "fr", "ru"], pairs.split(","))):
        hub = load(path, data_dir, langs=langs, lang_pairs=lang_pairs)
        assert hub.task.langs == ["en", "de", "fr", "ru"] and hub.task.args.lang_pairs == pairs.split(",")
        assert hub.translate(SENTENCES, beam=2) == want
    with pytest.raises(TaskMoeError, match="trained with --langs en,de,fr,ru but this run has --langs ru,fr,de,en; "
                                           "pass --langs en,de,fr,ru"):
        load(path, data_dir, langs="ru,fr,de,en")
