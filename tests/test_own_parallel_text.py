"""A user's own parallel text, any pairs (issue 31): raw files per pair, non-English-centric ones
included (de-fr, and de-en named that way round), through examples/data/binarize.py
(SentencePiece + fairseq-preprocess), fairseq-train with the plugin, extraction and translate
from the extracted folder alone. The same commands as NOTES-for-readme.md's "Your own parallel
text"; cut from the bundled LibreOffice text:

* de-fr: the bundled valid and test sets are multi-way (line i is the same English sentence in
  every en-xx pair), so their de and fr sides are translations of each other;
* de-en: the bundled en-de training text, written as ``*.de-en.{de,en}``.
"""

import os
import re
import sys
import tarfile

import pytest

from cli_helpers import BUNDLED, REPO, mask_times, run, run_main, run_in_process
from taskmoe_fairseq import translate

PAIRS = "de-fr,fr-de,de-en,en-de"
DE_FR_TRAIN, DE_EN_TRAIN, VALID, TEST = 400, 400, 20, 12


def make_pairs_raw(root):
    """``root/raw/{train,valid,test}.{de-fr,de-en}.*`` cut from the bundled archive."""
    with tarfile.open(BUNDLED) as archive:
        def lines(name):
            return archive.extractfile(f"libreoffice-6pairs/raw/{name}").read().decode("utf-8").splitlines(True)

        multiway = {lang: lines(f"valid.en-{lang}.{lang}") + lines(f"test.en-{lang}.{lang}") for lang in ("de", "fr")}
        train_de_en = {"de": lines("train.en-de.de"), "en": lines("train.en-de.en")}
    raw = os.path.join(root, "raw")
    os.makedirs(raw)
    cuts = {"train": (0, DE_FR_TRAIN), "valid": (DE_FR_TRAIN, DE_FR_TRAIN + VALID),
            "test": (DE_FR_TRAIN + VALID, DE_FR_TRAIN + VALID + TEST)}
    for split, (start, end) in cuts.items():
        for lang in ("de", "fr"):
            with open(os.path.join(raw, f"{split}.de-fr.{lang}"), "w", encoding="utf-8") as out:
                out.writelines(multiway[lang][start:end])
    cuts = {"train": (0, DE_EN_TRAIN), "valid": (DE_EN_TRAIN, DE_EN_TRAIN + VALID)}  # no test set: optional
    for split, (start, end) in cuts.items():
        for lang in ("de", "en"):
            with open(os.path.join(raw, f"{split}.de-en.{lang}"), "w", encoding="utf-8") as out:
                out.writelines(train_de_en[lang][start:end])
    return raw


@pytest.mark.slow
def test_own_pairs_from_raw_text_to_an_extracted_model(tmp_path):
    raw = make_pairs_raw(str(tmp_path))
    data, checkpoints, serve = (str(tmp_path / name) for name in ("bin", "checkpoints", "serve"))

    # 1. SentencePiece + fairseq-preprocess (its own process, as a user runs it)
    run([sys.executable, os.path.join(REPO, "examples", "data", "binarize.py"), "--raw", raw, "--out", data,
         "--pairs", "de-fr,de-en", "--vocab-size", "1000", "--workers", "1"])
    for name in ("spm.model", "dict.de.txt", "dict.fr.txt", "dict.en.txt", "train.de-fr.fr.bin", "valid.de-en.en.idx",
                 "test.de-fr.de.bin", "raw/test.de-fr.fr"):
        assert os.path.isfile(os.path.join(data, name)), name
    assert not os.path.exists(os.path.join(data, "test.de-en.de.bin"))
    import json

    meta = json.load(open(os.path.join(data, "binarize.json"), encoding="utf-8"))
    assert meta["lang_pairs"] == ["de-fr", "de-en"] and meta["lines"]["de-fr"] == {"train": DE_FR_TRAIN, "valid": VALID, "test": TEST}
    assert "--langs en,de,fr --lang-pairs de-fr,fr-de,de-en,en-de" in meta["fairseq_hint"]

    # 2. fairseq-train with the plugin, every direction of both pairs
    train = run_in_process([
        "fairseq-train", data, "--user-dir", os.path.join(REPO, "taskmoe_fairseq"),
        "--task", "multilingual_translation_taskmoe", "--lang-pairs", PAIRS, "--langs", "en,de,fr",
        "--encoder-langtok", "tgt", "--decoder-langtok",
        "--arch", "taskmoe_transformer_tiny", "--encoder-moe-routing", "token", "--decoder-moe-routing", "target",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "1500", "--max-update", "6",
        "--save-dir", checkpoints, "--no-epoch-checkpoints", "--cpu", "--seed", "1", "--num-workers", "0",
        "--log-format", "simple", "--log-interval", "2",
    ])
    log = mask_times(train.stdout + train.stderr)
    # the model's own expert count, next to fairseq's "num. expert model params: 0" (param.expert: expert parallelism only)
    assert re.search(r"expert parameters: [1-9][\d,]* of [\d,]+ \(2 MoE layers\)", log)
    valid = [line for line in log.splitlines() if "valid on 'valid' subset" in line][-1]
    for pair in PAIRS.split(","):
        assert f"loss_{pair} " in valid, pair  # every direction has validation data (fr-de read from de-fr files)

    # 3. extraction: one checkpoint per direction, with the dictionaries and spm.model beside them
    run_main("taskmoe_fairseq.extract", "--checkpoint", os.path.join(checkpoints, "checkpoint_last.pt"),
             "--all-lang-pairs", "--output-dir", serve)
    assert {"fr-de.pt", "dict.fr.txt", "spm.model"} <= set(os.listdir(serve))

    # 4. translate from the extracted folder alone
    os.rename(data, data + "-moved")
    sentences = [line.rstrip("\n") for line in open(os.path.join(raw, "test.de-fr.fr"), encoding="utf-8")][:4]
    translator = translate.load_translator(os.path.join(serve, "fr-de.pt"), "fr-de")
    assert translator.hub.task.args.data == serve
    assert len(translate.translate_lines(translator, sentences, beam=2, max_len_b=20)) == 4


def test_binarize_pair_problems_are_one_line_before_writing(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "examples", "data"))
    try:
        import binarize
        from script_support import UserError
    finally:
        sys.path.remove(os.path.join(REPO, "examples", "data"))
    raw = make_pairs_raw(str(tmp_path))
    out = str(tmp_path / "bin")
    with pytest.raises(UserError) as error:
        binarize.main(["--raw", raw, "--out", out, "--pairs", "de-fr,de-es"])
    assert str(error.value) == f"no training files for de-es in {raw} (expected train.de-es.{{de,es}})"
    # a pair named the other way round than its files is found: fr-de is read from the de-fr files
    assert binarize.discover(raw, pairs=["fr-de", "en-de"]) == {("de", "fr"): ["train", "valid", "test"], ("de", "en"): ["train", "valid"]}
    assert list(binarize.discover(raw)) == [("de", "en"), ("de", "fr")]
    for bad in ("de-de", "defr", "de-fr-en"):
        with pytest.raises(SystemExit) as exit:
            binarize.parse_args(["--raw", raw, "--out", out, "--pairs", bad])
        assert exit.value.code == 2
        assert f"--pairs entry '{bad}' is not of the form src-tgt" in capsys.readouterr().err
    assert not os.path.exists(out)
