"""``extract --prune-token-experts K`` and ``export --prune-token-experts 1`` through the real
CLIs on the trained token/target fixture (4 experts, top-2; the encoder routes per token):
K = E translates exactly like the full model in fairseq-generate; a K = 1 checkpoint loads in
fairseq-generate, translate, the server and the CTranslate2 export, which says it is not
exact; bad requests are one line, exit 2, and write nothing. The model operation itself is
tested in test_pruning.py."""

import json
import os
import re

import pytest
import sentencepiece

from cli_helpers import REPO, NO_LOADER_WORKERS, TASK_ARGS, TEST_LINES, python_module, raw_lines, run, run_in_process, run_main
from taskmoe_fairseq import translate
from taskmoe_fairseq.safe_loading import safe_torch_load
from taskmoe_fairseq.serve.service import TranslationService
from taskmoe_fairseq.serve.shared_weights import SharedWeights
from test_extract import assert_same_translations

PAIR = "ru-en"
MAX_LEN = 30


def extract(*args, real_process=False, check=True):
    if real_process:
        return run(python_module("taskmoe_fairseq.extract", *args), check=check)
    return run_main("taskmoe_fairseq.extract", *args, check=check)


def read_report(path):
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def test_keeping_every_expert_translates_exactly_like_the_full_model(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    folder = str(tmp_path / "k4")
    result = extract("--checkpoint", full, "--lang-pair", PAIR, "--output-dir", folder, "--prune-token-experts", "4",
                     "--data-dir", data_dir, real_process=True)
    assert "APPROXIMATES the full model" in result.stdout
    report = read_report(os.path.join(folder, f"{PAIR}.report.json"))
    assert report["approximate"] is True and report["pruned_token_experts"] == 4
    assert report["pruning"]["kind"] == "split" and report["pruning"]["metric"] == "load"
    assert report["pruning"]["data"] == os.path.join(os.path.abspath(data_dir), "valid")
    token_rows = [row for row in report["layers"] if row["routing"] == "token"]
    assert [row["layer"] for row in token_rows] == ["encoder.1"]
    assert sorted(token_rows[0]["experts_kept"]) == [0, 1, 2, 3] and token_rows[0]["kept_share"] == pytest.approx(1.0)
    assert [row["routing"] for row in report["layers"] if row["layer"] == "decoder.1"] == ["target"]  # extracted as before
    args = safe_torch_load(os.path.join(folder, f"{PAIR}.pt"))["cfg"]["model"]
    assert args.moe_pruned_token_experts == 4 and args.moe_extracted_lang_pair == PAIR
    assert_same_translations(data_dir, full, [folder], pairs=(PAIR,), beams=(1, 4))


@pytest.fixture(scope="module")
def dense(trained, data_dir, tmp_path_factory):
    """The ru-en sub-network of token/target with its encoder's token-routed layer pruned to one expert."""
    folder = str(tmp_path_factory.mktemp("pruned_k1"))
    extract("--checkpoint", trained.get("token", "target"), "--lang-pair", PAIR, "--output-dir", folder,
            "--prune-token-experts", "1", "--data-dir", data_dir)
    return os.path.join(folder, f"{PAIR}.pt")


def test_dense_pruned_checkpoint_runs_in_fairseq_generate_translate_and_the_server(dense, data_dir):
    report = read_report(dense.replace(".pt", ".report.json"))
    row = [row for row in report["layers"] if row["layer"] == "encoder.1"][0]
    assert len(row["experts_kept"]) == 1 and 0 < row["kept_share"] < 1 and row["params_after"] * 4 < row["params_before"]
    source, target = PAIR.split("-")
    generate = run_in_process(["fairseq-generate", data_dir, *TASK_ARGS, "--source-lang", source, "--target-lang", target,
                               "--path", dense, "--gen-subset", "test", "--beam", "1", "--max-len-a", "0",
                               "--max-len-b", str(MAX_LEN), "--batch-size", "16", "--cpu", *NO_LOADER_WORKERS])
    pieces = {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t[^\t]*\t(.*)$", generate.stdout, re.M)}
    assert sorted(pieces) == list(range(TEST_LINES))
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data_dir, "spm.model"))
    want = [sp.decode(pieces[i].split()).strip() for i in range(TEST_LINES)]

    lines = raw_lines(data_dir, PAIR)
    translator = translate.load_translator(dense, PAIR)  # the dictionaries and spm.model extract put beside it
    assert translate.translate_lines(translator, lines, beam=1, max_len_b=MAX_LEN) == want
    result = run_in_process(python_module("taskmoe_fairseq.translate", "--model", dense, "--lang-pair", PAIR, "--beam", "1",
                                    "--max-len-b", str(MAX_LEN)), stdin="\n".join(lines) + "\n")
    assert result.stdout.split("\n")[:-1] == want

    service = TranslationService(SharedWeights(dense))
    assert service.pairs == [PAIR]
    assert service.translate(PAIR, lines[:8], 1, MAX_LEN) == want[:8]


def test_dense_pruned_checkpoint_exports_to_ctranslate2_saying_it_is_not_exact(dense, trained, data_dir, tmp_path):
    from_checkpoint, from_full = str(tmp_path / "ct2"), str(tmp_path / "ct2-full")
    result = run_main("taskmoe_fairseq.export", "--checkpoint", dense, "--format", "ctranslate2", "--output-dir", from_checkpoint)
    notes = [line for line in result.stderr.splitlines() if "not exact" in line]
    assert len(notes) == 1 and notes[0].startswith(f"{PAIR}: note: the export is not exact")
    with open(os.path.join(from_checkpoint, "taskmoe_export.json"), encoding="utf-8") as stream:
        conventions = json.load(stream)
    assert conventions["exact"] is False and conventions["pruned_token_experts"] == 1
    assert [layer for layer in conventions["layers"] if "pruned" in json.dumps(layer)], conventions["layers"]

    # the same from the full checkpoint in one command
    result = run_main("taskmoe_fairseq.export", "--checkpoint", trained.get("token", "target"), "--lang-pair", PAIR,
                      "--output-dir", from_full, "--prune-token-experts", "1", "--data-dir", data_dir)
    assert "the export is not exact" in result.stderr

    lines = raw_lines(data_dir, PAIR)[:12]
    reference = translate.translate_lines(translate.load_translator(dense, PAIR), lines, beam=1, max_len_b=MAX_LEN)
    for folder in (from_checkpoint, from_full):
        ct2 = translate.load_translator(folder, PAIR)
        assert translate.translate_lines(ct2, lines, beam=1, max_len_b=MAX_LEN) == reference, folder


def test_text_sample_and_importance_metric(trained, data_dir, tmp_path):
    text = tmp_path / "ru.txt"
    text.write_text("\n".join(raw_lines(data_dir, PAIR)[:20]) + "\n", encoding="utf-8")
    out = str(tmp_path / "ru-en.pt")
    extract("--checkpoint", trained.get("token", "target"), "--lang-pair", PAIR, "--output", out, "--data-dir", data_dir,
            "--prune-token-experts", "2", "--pruning-data", str(text), "--pruning-metric", "importance")
    report = read_report(str(tmp_path / "ru-en.report.json"))
    assert report["pruning"] == {"data": str(text), "kind": "source text", "sentences": 20, "metric": "importance"}
    row = [row for row in report["layers"] if row["layer"] == "encoder.1"][0]
    assert row["metric"] == "importance" and len(row["experts_kept"]) == 2
    assert row["probability_share"] == sorted(row["probability_share"], reverse=True)
    assert row["tokens"] > 20


def assert_one_line(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taskmoe_fairseq.extract: error: "), result.stderr
    assert needle in lines[0], lines[0]


def test_bad_requests_are_one_line_and_write_nothing(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    out = str(tmp_path / "out" / "x.pt")

    def fails(needle, *args, checkpoint=full, real_process=False):
        result = extract("--checkpoint", checkpoint, "--lang-pair", PAIR, "--output", out, "--data-dir", data_dir, *args,
                         check=False, real_process=real_process)
        assert_one_line(result, needle)
        assert not os.path.exists(os.path.dirname(out)) or not os.listdir(os.path.dirname(out))

    fails("--prune-token-experts 5 must be between 1 and the model's 4 experts", "--prune-token-experts", "5", real_process=True)
    fails("--prune-token-experts 0 must be between 1", "--prune-token-experts", "0")
    fails("no MoE layer routes per token", "--prune-token-experts", "1", checkpoint=trained.get("pair", "pair", 2))
    fails("--pruning-data needs --prune-token-experts", "--pruning-data", "valid")
    fails("has no nosuch split for ru-en", "--prune-token-experts", "2", "--pruning-data", "nosuch")
    fails("no such file", "--prune-token-experts", "2", "--pruning-data", str(tmp_path / "none.txt"))
    fails("--pruning-sentences must be at least 1", "--prune-token-experts", "2", "--pruning-sentences", "0")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    fails("has no sentence", "--prune-token-experts", "2", "--pruning-data", str(empty))
    text = tmp_path / "ru.txt"
    text.write_text("привет\n", encoding="utf-8")
    fails("needs the pair's target text", "--prune-token-experts", "2", "--pruning-data", str(text),
          checkpoint=trained.get("token", "token", 1))
    no_data = tmp_path / "no-data"
    no_data.mkdir()
    result = extract("--checkpoint", full, "--lang-pair", "de-fr", "--output", out, "--data-dir", data_dir,
                     "--prune-token-experts", "2", check=False)  # zero-shot: no data of its own
    assert_one_line(result, "has no valid split for de-fr")
    assert not os.path.exists(out)


def test_export_pruning_requests_are_one_line(dense, trained, data_dir, tmp_path):
    out = str(tmp_path / "ct2")

    def fails(needle, *args):
        result = run_main("taskmoe_fairseq.export", *args, "--output-dir", out, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("taskmoe_fairseq.export: error: ") and needle in result.stderr, result.stderr
        assert not os.path.exists(out)

    full = trained.get("token", "target")
    fails("only K = 1 makes a token-routed layer dense", "--checkpoint", full, "--lang-pair", PAIR, "--prune-token-experts", "2")
    fails("--prune-token-experts 1", "--checkpoint", full, "--lang-pair", PAIR)  # the refusal names the way out
    fails("already the ru-en sub-network", "--checkpoint", dense, "--prune-token-experts", "1")
    fails("has no token-routed MoE layer", "--checkpoint", trained.get("pair", "pair", 2), "--lang-pair", PAIR,
          "--prune-token-experts", "1")
    fails("--pruning-data needs --prune-token-experts 1", "--checkpoint", full, "--lang-pair", PAIR, "--pruning-data", "valid")
    # the sample's problems are export's own line (they were a progress line, then "extraction failed:
    # taskmoe_fairseq.extract: error: ...") and leave no temporary folder
    pruning = ("--checkpoint", full, "--lang-pair", PAIR, "--prune-token-experts", "1", "--data-dir", data_dir)
    fails(f"error: --pruning-data nosuch: {data_dir} has no nosuch split for ru-en", *pruning, "--pruning-data", "nosuch")
    fails("error: --pruning-sentences must be at least 1, got 0", *pruning, "--pruning-sentences", "0")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_measure_pruning_script_records_the_full_model_and_each_k(trained, data_dir, tmp_path):
    """examples/measure_pruning.py on the tiny model, one pair: K = E is the full model (same
    hypotheses, zero difference), sizes shrink with K, the markdown is rendered from the record."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("measure_pruning", os.path.join(REPO, "examples", "measure_pruning.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out_json, out_md = str(tmp_path / "r.json"), str(tmp_path / "r.md")
    assert script.main(["--checkpoint", trained.get("token", "target"), "--data", data_dir, "--workdir", str(tmp_path / "work"),
                        "--ks", "1,4", "--pairs", PAIR, "--resamples", "20", "--jobs", "1",
                        "--out-json", out_json, "--out-md", out_md]) == 0
    record = read_report(out_json)
    (row,) = record["rows"]
    assert row["pair"] == PAIR and row["sentences"] == TEST_LINES and record["experts"] == 4
    same = row["pruned"]["4"]
    assert same["identical_hypotheses"] == TEST_LINES and same["chrf_delta"] == 0 and same["chrf_delta_95"] == [0, 0]
    assert same["params"] == row["exact"]["params"] and row["pruned"]["1"]["params"] < same["params"] < row["full"]["params"]
    assert record["goal"]["met"] is None  # the goal is about K = 2, not measured here
    with open(out_md, encoding="utf-8") as stream:
        text = stream.read()
    assert f"| {PAIR} | {row['full']['chrf']:.1f} |" in text and "pruned, K = 1 of 4" in text
