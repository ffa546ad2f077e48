"""python -m taskmoe_fairseq.translate: raw text in, detokenized text out, in input order, with
fairseq-generate's hypotheses, from a checkpoint (full or extracted) or a CTranslate2 export; and
fairseq-interactive taking raw text with ``--bpe sentencepiece``.

Models: the fairseq path uses the session's token/target model (12 updates, shared with other
tests). It is barely trained (its outputs are runs of ``er`` whose length follows the input), so
each test also checks that its reference would catch the bug it is about (outputs that are not all
alike, an order they would not survive). The CTranslate2 path needs an exportable routing: the
12-update target/target model decodes every sentence to a run of ``▁`` (empty text), which would
make the comparison vacuous, so it uses the 300-update target/target model that
``tests/test_export.py`` trains (shared in a session: no extra training in the suite).
"""

import io
import os
import re

import pytest
import sentencepiece

from cli_helpers import NO_LOADER_WORKERS, TASK_ARGS, TEST_LINES, python_module, raw_lines, run, run_in_process
from taskmoe_fairseq import extract, translate
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.export import cli as export_cli
from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

MAX_LEN = 30  # --max-len-b for every decoder here (fairseq's --max-len-a 0 --max-len-b 30)
EXPORT_UPDATES = 300  # the target/target model tests/test_export.py trains
ERROR_PREFIX = "taskmoe_fairseq.translate: error: "


def translate_command(*args):
    return python_module("taskmoe_fairseq.translate", *args)


def hub_reference(checkpoint, data_dir, lines, beam, pair="en-de"):
    """Each line translated alone (a batch of one) by fairseq's hub interface; blank lines stay blank."""
    source, target = pair.split("-")
    hub = TaskMoeTransformerModel.from_pretrained(
        os.path.dirname(checkpoint), checkpoint_file=os.path.basename(checkpoint), data_name_or_path=data_dir,
        source_lang=source, target_lang=target, bpe="sentencepiece",
        sentencepiece_model=os.path.join(data_dir, "spm.model"), cpu=True,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data_dir, "spm.model"))
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
            continue
        hypos = hub.generate([hub.encode(line)], beam=beam, max_len_a=0, max_len_b=MAX_LEN)
        out.append(sp.decode(hub.string(hypos[0][0]["tokens"]).split()).strip())
    return out


def output_lines(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.endswith("\n") or result.stdout == ""
    return result.stdout.split("\n")[:-1]


def test_keeps_input_order_and_empty_lines(trained, data_dir, tmp_path):
    full = trained.get("target", "target", EXPORT_UPDATES)  # trained enough to give varied outputs
    extracted = str(tmp_path / "en-de.pt")
    assert extract.main(["--checkpoint", full, "--lang-pair", "en-de", "--output", extracted]) == 0
    test = raw_lines(data_dir)
    lines = ["", test[0], " ".join(test[5:9]), "   ", test[1], test[0], "", "", *test[2:5], test[9], "", test[10], ""]
    result = run_in_process(translate_command("--model", extracted, "--lang-pair", "en-de", "--beam", "2", "--batch-size", "3",
                                   "--max-len-b", str(MAX_LEN)), stdin="\n".join(lines) + "\n")
    out = output_lines(result)
    assert len(out) == len(lines)
    assert [i for i, text in enumerate(out) if not text] == [i for i, line in enumerate(lines) if not line.strip()]
    assert "translating" not in result.stderr  # 9 sentences, stderr not a terminal: no progress bar
    want = hub_reference(full, data_dir, lines, beam=2)  # the full model, one sentence at a time
    assert out == want
    # the reference is able to catch a mix-up: outputs differ, and written in (roughly) the length-sorted
    # batch order they would not match
    filled = [i for i, line in enumerate(lines) if line.strip()]
    assert len({want[i] for i in filled}) >= 3
    by_length = sorted(filled, key=lambda i: -len(lines[i]))
    assert [want[i] for i in by_length] != [want[i] for i in filled]


@pytest.fixture(scope="module")
def generated(trained, data_dir):
    """translate, fairseq-generate and fairseq-interactive on the raw / binarized en-de test set, beam 4."""
    full = trained.get("target", "target", EXPORT_UPDATES)  # (12 updates can decode every sentence alike)
    spm = os.path.join(data_dir, "spm.model")
    lines = raw_lines(data_dir)
    same = ["--beam", "4", "--max-len-a", "0", "--max-len-b", str(MAX_LEN), "--cpu",
            "--bpe", "sentencepiece", "--sentencepiece-model", spm]
    generate = ["fairseq-generate", data_dir, *TASK_ARGS, "--source-lang", "en", "--target-lang", "de", "--path", full,
                "--gen-subset", "test", "--batch-size", "16", *NO_LOADER_WORKERS, *same]
    interactive = ["fairseq-interactive", data_dir, *TASK_ARGS, "--source-lang", "en", "--target-lang", "de", "--path", full,
                   "--buffer-size", "8", "--batch-size", "8", *same]
    ours = translate_command("--model", full, "--lang-pair", "en-de", "--beam", "4", "--max-len-b", str(MAX_LEN))
    text = "\n".join(lines) + "\n"
    # the three commands' entry points in this process (cli_helpers.run_in_process)
    results = [run_in_process(ours, stdin=text, check=False), run_in_process(generate), run_in_process(interactive, stdin=text)]
    assert results[0].returncode == 0, results[0].stderr[-3000:]
    return lines, results


def fairseq_lines(stdout, kind):
    """``{id: text}`` of fairseq's ``H``/``D`` lines (text after the score)."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(rf"^{kind}-(\d+)\t[^\t]*\t(.*)$", stdout, re.M)}


def test_same_hypotheses_as_fairseq_generate(generated, data_dir):
    lines, (ours, generate, _) = generated
    out = output_lines(ours)
    pieces, detok = fairseq_lines(generate.stdout, "H"), fairseq_lines(generate.stdout, "D")
    assert sorted(pieces) == list(range(TEST_LINES)) == list(range(len(out)))
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data_dir, "spm.model"))
    # H- lines are the pieces (tags stripped); SentencePiece turns them into text
    assert out == [sp.decode(pieces[i].split()).strip() for i in range(TEST_LINES)]
    # fairseq's own sentencepiece post-processing (D- lines) agrees where no byte-fallback piece occurs
    plain = [i for i in range(TEST_LINES) if "<0x" not in pieces[i]]
    assert plain and [out[i] for i in plain] == [detok[i] for i in plain]
    assert len(set(out)) >= 3  # not one degenerate output for every sentence


def test_fairseq_interactive_takes_raw_text(generated, data_dir):
    lines, (ours, generate, interactive) = generated
    sources = {int(m.group(1)): m.group(2) for m in re.finditer(r"^S-(\d+)\t(.*)$", interactive.stdout, re.M)}
    with open(os.path.join(data_dir, "spm", "test.en-de.en"), encoding="utf-8") as stream:
        binarized = [line.rstrip("\n") for line in stream]  # the pieces binarize.py gave fairseq-preprocess
    # raw lines in: fairseq-interactive's --bpe sentencepiece gives exactly the binarized source, tag first
    assert [sources[i] for i in range(TEST_LINES)] == ["__de__ " + pieces for pieces in binarized]
    hypotheses, generated_pieces = fairseq_lines(interactive.stdout, "H"), fairseq_lines(generate.stdout, "H")
    assert [hypotheses[i] for i in range(TEST_LINES)] == [generated_pieces[i] for i in range(TEST_LINES)]
    detok, out = fairseq_lines(interactive.stdout, "D"), output_lines(ours)
    assert [detok[i] for i in range(TEST_LINES) if "<0x" not in hypotheses[i]] == [
        out[i] for i in range(TEST_LINES) if "<0x" not in hypotheses[i]]


@pytest.fixture(scope="module")
def ct2_export(trained, tmp_path_factory):
    """(merged en-de sub-network, its CTranslate2 folder) of the 300-update target/target model."""
    full = trained.get("target", "target", EXPORT_UPDATES)
    root = tmp_path_factory.mktemp("translate_ct2")
    extracted, folder = str(root / "en-de.pt"), str(root / "ct2-en-de")
    assert extract.main(["--checkpoint", full, "--lang-pair", "en-de", "--output", extracted, "--merge-experts"]) == 0
    # (the export command itself is tested in test_export.py; here it runs in this process)
    assert export_cli.main(["--checkpoint", extracted, "--format", "ctranslate2", "--output-dir", folder]) == 0
    return extracted, folder


def test_ctranslate2_folder_translates_like_the_hub(ct2_export, data_dir):
    extracted, folder = ct2_export
    lines = raw_lines(data_dir)[:10]
    lines = [lines[0], "", *lines[1:6], "  ", *lines[6:]]
    result = run_in_process(translate_command("--model", folder, "--lang-pair", "en-de", "--beam", "1", "--max-len-b", str(MAX_LEN),
                                   "--batch-size", "4"), stdin="\n".join(lines) + "\n")
    out = output_lines(result)
    want = hub_reference(extracted, data_dir, lines, beam=1)
    assert out == want
    assert len({text for text in want if text}) >= 3  # the model's outputs depend on the input


def assert_one_line_error(status, stderr, *needles):
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_bad_input_is_one_line(trained, data_dir, ct2_export, tmp_path, capsys):
    full = trained.get("token", "target")
    _, folder = ct2_export
    # through the real command in a fresh interpreter (the tool's cold-start test): an unknown pair, found
    # by fairseq's task while the hub loads the model
    unknown = run(translate_command("--model", full, "--lang-pair", "en-xx"), stdin="Hello\n", check=False)
    assert_one_line_error(unknown.returncode, unknown.stderr, "unknown language pair en-xx")
    assert unknown.stdout == ""

    # the same entry point in this process (no interpreter start-up per case)
    def cli(*args):
        status = translate.main(list(args))
        return status, capsys.readouterr().err

    assert_one_line_error(*cli("--model", str(tmp_path / "none.pt"), "--lang-pair", "en-de"),
                          "none.pt: no such checkpoint file or CTranslate2 folder")
    not_export = tmp_path / "not-an-export"
    not_export.mkdir()
    (not_export / "model.bin").write_bytes(b"")
    assert_one_line_error(*cli("--model", str(not_export), "--lang-pair", "en-de"), "not a CTranslate2 export")
    assert_one_line_error(*cli("--model", folder, "--lang-pair", "de-en"), "is the CTranslate2 export of en-de; it cannot translate de-en")
    bad_spm = tmp_path / "broken.model"
    bad_spm.write_bytes(b"not a sentencepiece model")
    assert_one_line_error(*cli("--model", folder, "--lang-pair", "en-de", "--spm-model", str(bad_spm)),
                          "broken.model: not a readable SentencePiece model")
    assert_one_line_error(*cli("--model", full, "--lang-pair", "en-de", "--spm-model", str(bad_spm)),
                          "broken.model: not a readable SentencePiece model")
    assert_one_line_error(*cli("--model", full, "--lang-pair", "en-de", "--spm-model", str(tmp_path / "none.model")),
                          "none.model not found")
    assert_one_line_error(*cli("--model", full, "--lang-pair", "ende"), "not of the form SRC-TGT")
    assert_one_line_error(*cli("--model", full, "--lang-pair", "en-de", "--beam", "0"), "--beam must be at least 1")
    assert_one_line_error(*cli("--lang-pair", "en-de"), "--model")
    with pytest.raises(TaskMoeError, match="not a CTranslate2 export"):  # the library raises, never exits
        translate.load_translator(str(not_export), "en-de")


def test_checkpoint_and_ctranslate2_paths_refuse_the_same_long_lines(ct2_export, data_dir, capsys, monkeypatch):
    """The encoder reads at most --max-source-positions (1024) tokens: the tag, the pieces and </s>.
    The checkpoint path refused a longer line, the CTranslate2 path truncated it silently and
    exited 0 (issue 28): both now take 1022 pieces and refuse 1023 with the same line."""
    extracted, folder = ct2_export
    with open(os.path.join(folder, "taskmoe_export.json"), encoding="utf-8") as stream:
        assert '"max_source_positions": 1024' in stream.read()
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data_dir, "spm.model"))
    assert sp.encode("the the the", out_type=str) == ["▁the"] * 3  # one piece a word

    def cli(model, pieces):
        lines = "Click the button.\n" + " ".join(["the"] * pieces) + "\n"
        monkeypatch.setattr("sys.stdin", io.StringIO(lines))
        extra = ("--data-dir", data_dir) if model == extracted else ()
        status = translate.main(["--model", model, "--lang-pair", "en-de", "--beam", "1", "--max-len-b", "5", *extra])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    for model in (extracted, folder):
        status, out, err = cli(model, 1022)
        assert status == 0 and len(out.splitlines()) == 2, (model, err)
        status, out, err = cli(model, 1023)
        assert (status, out) == (2, ""), model
        assert err == ERROR_PREFIX + "input line 2 has 1024 tokens; the model takes at most 1023 (split the line)\n", model


def test_device_choice(trained, data_dir, ct2_export, capsys):
    """``--device`` / ``--device-index`` for both kinds of model: ``cpu`` and ``auto`` translate (here, on
    the CPU: the hub's outputs); ``cuda`` runs on a CUDA device where the backend sees one (torch for a
    checkpoint, CTranslate2's own build for a folder) and is one line, exit status 2, where it does not."""
    import ctranslate2
    import torch

    extracted, folder = ct2_export
    lines = raw_lines(data_dir)[:4]
    want = hub_reference(extracted, data_dir, lines, beam=1)
    assert len(set(want)) >= 2  # the outputs depend on the input
    for model, cuda_devices in ((extracted, torch.cuda.device_count()), (folder, ctranslate2.get_cuda_device_count())):
        for device, index in (("cpu", None), ("cpu", 0), ("auto", None)):
            translator = translate.load_translator(model, "en-de", device=device, device_index=index)
            if not cuda_devices:
                assert translate.translate_lines(translator, lines, beam=1, max_len_b=MAX_LEN) == want, (model, device)
        for index in sorted({0, cuda_devices - 1}) if cuda_devices else ():
            # on a GPU: the model is placed there (float results may differ from the CPU's in the last bits)
            translator = translate.load_translator(model, "en-de", device="cuda", device_index=index)
            if translator.kind == "fairseq":
                assert next(translator.hub.parameters()).device == torch.device("cuda", index)
            else:
                assert (translator.translator.device, translator.translator.device_index) == ("cuda", [index])
            assert len(translate.translate_lines(translator, lines, beam=1, max_len_b=MAX_LEN)) == len(lines)
        if not cuda_devices:
            status = translate.main(["--model", model, "--lang-pair", "en-de", "--device", "cuda"])
            assert_one_line_error(status, capsys.readouterr().err, "--device cuda: no CUDA device is visible")
        status = translate.main(["--model", model, "--lang-pair", "en-de", "--device", "cpu", "--device-index", "1"])
        assert_one_line_error(status, capsys.readouterr().err, "--device-index 1 numbers CUDA devices")
    # the real command: the option parses and the model runs on the CPU
    result = run_in_process(translate_command("--model", folder, "--lang-pair", "en-de", "--beam", "1", "--max-len-b", str(MAX_LEN),
                                        "--device", "cpu"), stdin="\n".join(lines) + "\n")
    assert output_lines(result) == want


@pytest.mark.slow
def test_a_write_error_on_standard_output_is_one_line_not_lost_lines(trained, data_dir, tmp_path):
    """The translations go to a file under a 4 KiB file-size limit (a disk filling up): the write that
    crosses it comes back short without an error, and the old code lost the rest silently (exit 0,
    lines missing). Now: one line, exit 2."""
    import resource
    import subprocess

    from cli_helpers import ENV, REPO

    checkpoint = trained.get("token", "target")
    lines = (raw_lines(data_dir) * 60)[:1200]
    source, out = tmp_path / "in.en", tmp_path / "out.de"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    limit = 4096

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = translate_command("--model", checkpoint, "--lang-pair", "en-de", "--beam", "1", "--max-len-b", "20",
                                "--data-dir", data_dir, "--no-progress")
    with open(source, "rb") as stdin, open(out, "wb") as stdout:
        result = subprocess.run(command, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV,
                                cwd=REPO, preexec_fn=limit_file_size, timeout=600)
    written = out.read_bytes()
    assert len(written) == limit  # the output did cross the limit: the case is the one under test
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [ERROR_PREFIX + "cannot write the translations to standard output: File too "
                                          "large (EFBIG); the output is incomplete: free space or raise the limit and "
                                          "run it again"]


@pytest.mark.parametrize("lines, options, message", [
    ("Open the file.", {}, "takes a list of strings (one sentence each), not str"),
    (["Open the file.", None], {}, "not a list holding other objects"),
    (["Open the file."], {"beam": 0}, "beam must be a positive integer, got 0"),
    (["Open the file."], {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    (["Open the file."], {"max_len_b": 2.5}, "max_len_b must be a positive integer, got 2.5"),
])
def test_translate_lines_refuses_bad_arguments_in_one_line(trained, lines, options, message):
    """The library function (docs/serving.md): bad arguments are a TaskMoeError, not fairseq's RuntimeError
    (beam 0) or a string translated one character at a time."""
    translator = translate.load_translator(trained.get("target", "target", EXPORT_UPDATES), "en-de")
    with pytest.raises(TaskMoeError, match=re.escape(message)):
        translate.translate_lines(translator, lines, **options)
