"""Adding a language to a trained model (``--moe-add-langs``, docs/add-language.md): Italian from the
bundled slice, binarized against the old model's dictionary (``binarize.py --extend-from``), added
with a few updates on fairseq-train's fine-tuning path; every old pair's extracted sub-network is
then tensor for tensor the one extracted before and fairseq-generate gives the same hypotheses,
only the new parameters trained (the optimizer holds nothing else), the checkpoint has the ordinary
layout, and the new pairs extract, generate and translate like any other. What cannot be added is
one line."""

import json
import math
import os
import tarfile

import numpy as np

import pytest
import torch

from cli_helpers import (LANG_PAIRS, LANGS, REPO, TASK_ARGS, TEST_LINES, TRAIN_LINES, VALID_LINES, generate_command,
                         parse_generation, python_module, run, run_in_process, run_main, train_command)
from model_helpers import build_model, fake_task
from taskmoe_fairseq.safe_loading import safe_torch_load
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.modules.task_gate import TaskGate

ARCHIVE = os.path.join(REPO, "examples", "data", "bundled", "libreoffice-en-it.tar.xz")
BINARIZE = os.path.join(REPO, "examples", "data", "binarize.py")
NEW_LANGS = LANGS + ",it"
NEW_PAIRS = LANG_PAIRS + ["en-it", "it-en"]
ADD = ("--moe-add-langs", "it", "--moe-new-experts", "2", "--moe-new-experts-init-from", "fr")


def with_languages(command, langs=NEW_LANGS, pairs=NEW_PAIRS):
    """A fixture command (cli_helpers' TASK_ARGS) with other ``--langs`` and ``--lang-pairs``."""
    command = list(command)
    command[command.index("--langs") + 1] = langs
    command[command.index("--lang-pairs") + 1] = ",".join(pairs)
    return command


@pytest.fixture(scope="module")
def extended_data(data_dir, tmp_path_factory):
    """The fixture data plus en-it (the bundled slice cut to the fixture's sizes), binarized with
    ``--extend-from`` the fixture data."""
    root = tmp_path_factory.mktemp("it")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    raw = root / "raw"
    raw.mkdir()
    for split, lines in (("train", TRAIN_LINES), ("valid", VALID_LINES), ("test", TEST_LINES)):
        for lang in ("en", "it"):
            text = (root / "libreoffice-en-it" / "raw" / f"{split}.en-it.{lang}").read_text(encoding="utf-8")
            (raw / f"{split}.en-it.{lang}").write_text("".join(line + "\n" for line in text.splitlines()[:lines]),
                                                       encoding="utf-8")
    out = str(root / "bin")
    run(["python", BINARIZE, "--raw", str(raw), "--out", out, "--extend-from", data_dir, "--langs", "it", "--workers", "1"])
    return out


def add_italian(trained, extended_data, folder, routing, updates=3):
    old = trained.get(*routing)
    command = with_languages(train_command(extended_data, folder, *routing, updates, ("--finetune-from-model", old, *ADD)))
    run_in_process(command)
    return old, os.path.join(folder, "checkpoint_last.pt")


@pytest.fixture(scope="module")
def added(trained, extended_data, tmp_path_factory):
    """(old checkpoint, checkpoint after adding it) for token/target routing."""
    return add_italian(trained, extended_data, str(tmp_path_factory.mktemp("added")), ("token", "target"))


def extract_all(checkpoint, folder):
    run_main("taskmoe_fairseq.extract", "--checkpoint", checkpoint, "--all-lang-pairs", "--output-dir", str(folder))


def model_state(path):
    return safe_torch_load(path)["model"]


def test_binarize_extend_from_keeps_the_old_dictionary_and_pairs(data_dir, extended_data):
    for name in ["spm.model", "dict.txt"] + [f"{split}.en-de.{lang}.{ext}" for split in ("train", "test")
                                             for lang in ("en", "de") for ext in ("bin", "idx")]:
        with open(os.path.join(data_dir, name), "rb") as old, open(os.path.join(extended_data, name), "rb") as new:
            assert old.read() == new.read(), name
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(os.path.join(extended_data, "dict.it.txt"))
    italian = data_utils.load_indexed_dataset(os.path.join(extended_data, "train.en-it.it"), dictionary)
    assert len(italian) == TRAIN_LINES
    assert not any(bool((italian[i] == dictionary.unk()).any()) for i in range(len(italian)))  # byte fallback


@pytest.mark.parametrize("routing", [("token", "target"), ("pair", "pair")], ids="/".join)
def test_old_pairs_extract_bit_identical_and_generate_the_same(routing, trained, extended_data, data_dir, added, tmp_path):
    old, new = added if routing == ("token", "target") else add_italian(trained, extended_data, str(tmp_path / "add"), routing, 2)
    extract_all(old, tmp_path / "before")
    extract_all(new, tmp_path / "after")
    for pair in LANG_PAIRS:
        before, after = model_state(tmp_path / "before" / f"{pair}.pt"), model_state(tmp_path / "after" / f"{pair}.pt")
        assert before.keys() == after.keys(), pair
        assert all(torch.equal(before[key], after[key]) for key in before), pair
    for pair in ("en-de", "ru-en"):  # the old data folder and --langs: the sub-network is the one from before
        outputs = [parse_generation(run_in_process(generate_command(data_dir, str(tmp_path / folder / f"{pair}.pt"), pair, 2)).stdout)
                   for folder in ("before", "after")]
        assert outputs[0] == outputs[1] and len(outputs[0]) == TEST_LINES, pair
    # the new pairs' sub-networks exist, with the new experts where a task gate chose them
    assert (tmp_path / "after" / "en-it.pt").is_file() and (tmp_path / "after" / "it-en.pt").is_file()


def test_only_the_new_parameters_train_and_the_layout_is_ordinary(added):
    old_path, new_path = added
    old, saved = model_state(old_path), safe_torch_load(new_path)
    new = saved["model"]
    experts = 4  # the tiny preset
    vocab = old["encoder.embed_tokens.weight"].size(0)
    gate = "encoder.moe_router.gates.decoder_1.task_logits"
    # the ordinary layout: the keys of a model built from the checkpoint's own args, grown shapes
    assert not [key for key in new if key.endswith(("_new", "_frozen"))]
    assert new["encoder.embed_tokens.weight"].shape == (vocab + 1, old["encoder.embed_tokens.weight"].size(1))
    assert new[gate].shape == (5, experts + 2)
    stacked = "decoder.layers.1.moe.experts.fc1_weight"  # the layer's experts, stacked [E, F, C]
    assert new[stacked].size(0) == experts + 2
    assert new["encoder.layers.1.moe.experts.fc1_weight"].size(0) == experts  # the token-routed encoder: no new experts
    # every old tensor, and the old part of each grown one, is the old checkpoint's
    for key, value in old.items():
        if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            assert torch.equal(new[key][:vocab], value), key
        elif key == gate:
            assert torch.equal(new[key][:4, :experts], value)
            assert bool(torch.isneginf(new[key][:4, experts:]).all())
        elif key.startswith("decoder.layers.1.moe.experts."):
            assert torch.equal(new[key][:experts], value), key
        else:
            assert torch.equal(new[key], value), key
    # the new parts trained: the new experts moved away from the fr experts they were copied from
    fr_experts = old[gate][2].topk(2).indices.tolist()
    assert not torch.equal(new[stacked][experts], old[stacked][fr_experts[0]])
    # fairseq's optimizer held only the new parameters: two experts, the it gate row, the __it__ embedding row
    dim, ffn = new["encoder.embed_tokens.weight"].size(1), new[stacked].size(1)
    args = saved["cfg"]["model"]
    tables = 1 if args.share_all_embeddings else 2 if args.share_decoder_input_output_embed else 3
    expected = 2 * (2 * dim * ffn + ffn + dim) + (experts + 2) + tables * dim
    held = sum(value["exp_avg"].numel() for value in saved["last_optimizer_state"]["state"].values())
    assert held == expected


def test_new_pairs_extract_generate_and_translate(added, extended_data, tmp_path):
    _, new = added
    extract_all(new, tmp_path / "sub")
    for pair in ("en-it", "it-en"):
        full = run_in_process(with_languages(generate_command(extended_data, new, pair, 2)))
        sub = run_in_process(with_languages(generate_command(extended_data, str(tmp_path / "sub" / f"{pair}.pt"), pair, 2)))
        assert parse_generation(full.stdout) == parse_generation(sub.stdout) and len(parse_generation(sub.stdout)) == TEST_LINES
    result = run(python_module("taskmoe_fairseq.translate", "--model", str(tmp_path / "sub" / "en-it.pt"), "--lang-pair",
                               "en-it", "--beam", "2", "--no-progress"), stdin="Open the file.\nSave the document.\n")
    assert len(result.stdout.splitlines()) == 2 and "Traceback" not in result.stderr


def test_a_new_pair_exports_to_ctranslate2_as_its_pruned_extraction(added, extended_data, tmp_path):
    """en-it of the grown token/target model exports like any pair (its token-routed encoder pruned to one
    expert, the export's rule): the CTranslate2 model scores the references as fairseq-generate
    (``--score-reference``) scores them with the pruned extracted checkpoint, piece by piece, and
    ``translate`` runs on the export. (A 3-update model writes empty translations, so the references,
    not its hypotheses, are what is compared.)"""
    import ctranslate2
    import sentencepiece

    from taskmoe_fairseq.export.conventions import CONVENTIONS_FILE, source_tokens, target_prefix

    _, new = added
    ct2, pruned = str(tmp_path / "ct2"), str(tmp_path / "en-it.pt")
    pruning = ("--prune-token-experts", "1", "--data-dir", extended_data)
    run_main("taskmoe_fairseq.export", "--checkpoint", new, "--lang-pair", "en-it", "--format", "ctranslate2",
             "--output-dir", ct2, *pruning)
    run_main("taskmoe_fairseq.extract", "--checkpoint", new, "--lang-pair", "en-it", "--output", pruned, *pruning)
    scored = parse_generation(run_in_process(
        with_languages(generate_command(extended_data, pruned, "en-it", 1)) + ["--score-reference"]).stdout)
    assert sorted(scored) == list(range(TEST_LINES))
    with open(os.path.join(ct2, CONVENTIONS_FILE), encoding="utf-8") as stream:
        conv = json.load(stream)
    pieces = sentencepiece.SentencePieceProcessor(model_file=os.path.join(ct2, conv["sentencepiece_model"]))
    with open(os.path.join(os.path.dirname(extended_data), "raw", "test.en-it.en"), encoding="utf-8") as stream:
        sources = [source_tokens(conv, pieces.encode(line.rstrip("\n"), out_type=str)) for line in stream]
    prefix = target_prefix(conv) or []
    # --score-reference scores the reference as the dataset holds it, the target tag first (generation's forced prefix)
    assert all(scored[i][0].split()[:len(prefix)] == prefix for i in range(TEST_LINES)), scored[0][0]
    targets = [scored[i][0].split() for i in range(TEST_LINES)]
    translator = ctranslate2.Translator(ct2, device="cpu", intra_threads=1)
    for i, result in enumerate(translator.score_batch(sources, targets)):
        ours, theirs = np.array(result.log_probs), np.array(scored[i][2]) * math.log(2)  # fairseq prints base 2
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 2e-4, f"sentence {i}"
    translated = run_main("taskmoe_fairseq.translate", "--model", ct2, "--lang-pair", "en-it", "--beam", "1",
                          "--no-progress", stdin="Open the file.\nSave the document.\n").stdout
    assert len(translated.splitlines()) == 2


def test_a_task_gate_with_added_experts_routes_old_tasks_bit_identically():
    """An old task's weights are the softmax over its own E logits (not over E + N with -inf, whose
    vectorised sum differs in the last bit for some widths: E = 8, N = 8 here)."""
    torch.manual_seed(0)
    old = TaskGate(4, 8, top_k=2)
    grown = TaskGate(5, 16, top_k=2, old_tasks=[True] * 4 + [False], old_experts=8)
    with torch.no_grad():
        grown.task_logits[:4, :8] = old.task_logits
        grown.task_logits[:4, 8:] = 10.0  # larger than every old logit: an old task must still never take them
        grown.task_logits[4] = torch.arange(16.0)
    for tasks in (torch.arange(4), torch.tensor([3, 0, 0, 2])):
        probs, weights, index = old.route_tasks(tasks)
        grown_probs, grown_weights, grown_index = grown.route_tasks(tasks)
        assert torch.equal(grown_probs[:, :8], probs) and bool((grown_probs[:, 8:] == 0).all())
        assert torch.equal(grown_weights, weights) and torch.equal(grown_index, index)
    assert grown.route_tasks(torch.tensor([4]))[2].tolist() == [[15, 14]]  # the new task reaches the new experts


@pytest.mark.parametrize("overrides, message", [
    (dict(encoder_routing="token", decoder_routing="token", moe_add_langs=["fr"]),
     "the model routes its MoE layers by token/token (encoder/decoder): with no learned task gate"),
    (dict(moe_add_langs=["de"]), "--moe-add-langs de must be the last languages of --langs (en,de,fr)"),
    (dict(moe_new_experts=2), "--moe-new-experts needs --moe-add-langs LANGS"),
    (dict(moe_add_langs=["fr"], moe_new_experts_init_from="fr"),
     "--moe-new-experts-init-from fr is not one of the model's languages (en,de)"),
], ids=["token-token", "not-appended", "experts-alone", "init-from-new"])
def test_what_cannot_be_added_is_one_line(overrides, message):
    with pytest.raises(TaskMoeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(task=fake_task(), **overrides)


def test_fairseq_train_refuses_adding_to_a_token_routed_model_in_one_line(trained, extended_data, tmp_path):
    old = trained.get("token", "token", 1)
    command = with_languages(train_command(extended_data, str(tmp_path / "add"), "token", "token", 2,
                                           ("--finetune-from-model", old, *ADD)))
    refused = run_in_process(command, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "taskmoe-fairseq: error: the model routes its MoE layers by token/token (encoder/decoder)")
    # appended languages without the switch: the checkpoint's language order, one line
    plain = with_languages(train_command(extended_data, str(tmp_path / "plain"), "token", "target", 2,
                                         ("--finetune-from-model", trained.get("token", "target"))))
    refused = run_in_process(plain, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "was trained with --langs en,de,fr,ru but this run has --langs en,de,fr,ru,it" in refused.stderr.strip().splitlines()[-1]


def test_binarize_extend_from_refuses_its_own_folder_and_old_pairs(data_dir, extended_data, tmp_path):
    raw = os.path.join(os.path.dirname(extended_data), "raw")
    same = run(["python", BINARIZE, "--raw", raw, "--out", data_dir, "--extend-from", data_dir, "--langs", "it"], check=False)
    assert same.returncode == 2 and same.stderr.strip().splitlines()[-1] == (
        f"error: --out {data_dir} is the --extend-from folder, which is never modified; choose a new --out")
    again = run(["python", BINARIZE, "--raw", raw, "--out", str(tmp_path / "out"), "--extend-from", extended_data,
                 "--langs", "it"], check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        f"error: --extend-from {extended_data} already has en-it; --extend-from adds new pairs only")
    assert not os.path.exists(tmp_path / "out")


def test_the_server_serves_the_new_pairs_as_their_extraction(added, tmp_path):
    """The server assembles each pair's sub-network on the meta device from the shared weights: the new
    pair's is the extracted one, and it translates (a gate's old-task mask is no buffer the meta
    model would lack)."""
    from taskmoe_fairseq.serve.service import TranslationService
    from taskmoe_fairseq.serve.shared_weights import SharedWeights

    _, new = added
    service = TranslationService(SharedWeights(new), max_expert_sets=2)
    assert {"en-it", "it-en"} <= set(service.pairs)
    texts = service.translate("en-it", ["Open the file.", "Save the document."], 2, 10)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
    served = service.store._sets[service.store.key_of("en-it")].model.state_dict()
    extract_all(new, tmp_path / "sub")
    extracted = model_state(tmp_path / "sub" / "en-it.pt")
    assert sorted(served) == sorted(extracted) and all(torch.equal(served[key], extracted[key]) for key in extracted)
