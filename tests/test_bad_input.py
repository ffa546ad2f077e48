"""Bad input stops with one line that names the problem and the fix; never a traceback,
never a half-written file.

One case runs as a real process (fairseq-train: the unknown routing name; each command has its own
real-process smoke test elsewhere); the others run the command's entry point in this process
(``cli_helpers.run_in_process``: the same exit status and stderr, the excepthook's one line included)."""

import decimal
import os

import pytest
import torch

from cli_helpers import generate_command, python_module, run, run_in_process, train_command
from taskmoe_fairseq import extract
from taskmoe_fairseq.safe_loading import safe_torch_load


def assert_one_line_error(result, expected):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]


def with_option(command, option, value=None):
    command = [part for part in command]
    if option in command:
        index = command.index(option)
        del command[index: index + (2 if value is not None else 1)]
    return command + ([option, value] if value is not None else [option])


def without(command, *options_with_values, flags=()):
    command = list(command)
    for option in options_with_values:
        index = command.index(option)
        del command[index: index + 2]
    return [part for part in command if part not in flags]


@pytest.fixture
def train(data_dir, tmp_path):
    return train_command(data_dir, str(tmp_path / "ckpt"), "token", "target", 1)


@pytest.mark.slow
def test_unknown_routing_name(train):
    command = with_option(train, "--decoder-moe-routing", "by-magic")
    result = run(command, check=False)
    assert_one_line_error(result, "--decoder-moe-routing: invalid choice: 'by-magic'")
    in_process = run_in_process(command, check=False)  # what the in-process cases below rely on: the same status and stderr
    assert (in_process.returncode, in_process.stderr) == (result.returncode, result.stderr)
    # fairseq-train configures logging (its format, stdout) before importing fairseq, which logs a line while imported
    assert "| INFO | fairseq.tasks.text_to_speech | Please install tensorboardX" in result.stdout


def test_task_routing_without_language_tags(train):
    result = run_in_process(without(train, "--encoder-langtok", flags=("--decoder-langtok",)), check=False)
    assert_one_line_error(result, "no target-language tag")
    assert "--encoder-langtok tgt" in result.stderr


def test_top_k_greater_than_expert_count(train):
    result = run_in_process(with_option(with_option(train, "--moe-expert-count", "4"), "--moe-top-k", "6"), check=False)
    assert_one_line_error(result, "--moe-top-k 6 must be between 1 and --moe-expert-count (4)")


def test_language_pair_using_a_language_outside_langs(train):
    command = list(train)
    command[command.index("--lang-pairs") + 1] = "en-de,en-ja"
    assert_one_line_error(run_in_process(command, check=False), "--lang-pairs uses ja, which --langs (en,de,fr,ru) lacks")


def test_generate_for_a_pair_outside_the_languages_or_without_data(trained, data_dir):
    command = generate_command(data_dir, trained.get("token", "target"), "de-ja", beam=1)
    assert_one_line_error(run_in_process(command, check=False), "unknown language pair de-ja: the model knows en-de,de-en")
    command = generate_command(data_dir, trained.get("token", "target"), "de-fr", beam=1)
    assert_one_line_error(run_in_process(command, check=False), "de-fr is zero-shot: --lang-pairs has no test data for it")


def test_generate_with_the_stock_task_on_a_task_routed_model(trained, data_dir):
    command = generate_command(data_dir, trained.get("token", "target"), "en-de", beam=1)
    command[command.index("multilingual_translation_taskmoe")] = "translation_multi_simple_epoch"
    assert_one_line_error(run_in_process(command, check=False), "run it with --task multilingual_translation_taskmoe")


@pytest.mark.parametrize("damage", ["truncated", "unsafe global"])
def test_checkpoint_that_fails_safe_loading(damage, trained, data_dir, tmp_path):
    good = trained.get("token", "target")
    bad = str(tmp_path / "bad.pt")
    if damage == "truncated":
        data = open(good, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
        expected = "truncated"
    else:
        state = safe_torch_load(good)
        state["extra_state"]["note"] = decimal.Decimal("1.5")  # not on the allow-list
        torch.save(state, bad)
        expected = "refused by torch's safe loader"
    assert_one_line_error(run_in_process(generate_command(data_dir, bad, "en-de", beam=1), check=False), expected)


# ---- python -m taskmoe_fairseq.extract ------------------------------------------------


def run_extract(capsys, *argv):
    status = extract.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_extract_missing_truncated_and_corrupt_files(capsys, trained, tmp_path):
    status, _, err = run_extract(capsys, "--checkpoint", str(tmp_path / "nope.pt"), "--lang-pair", "en-de", "--report-only")
    assert status == 2 and "no such checkpoint file" in err
    data = open(trained.get("token", "target"), "rb").read()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 3])
    status, _, err = run_extract(capsys, "--checkpoint", str(tmp_path / "half.pt"), "--lang-pair", "en-de", "--report-only")
    assert status == 2 and "truncated" in err
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    status, _, err = run_extract(capsys, "--checkpoint", str(tmp_path / "noise.pt"), "--lang-pair", "en-de", "--report-only")
    assert status == 2 and "corrupt" in err
    assert err.count("\n") == 1


def test_extract_rejects_a_checkpoint_that_is_not_taskmoe(capsys, trained, tmp_path):
    state = safe_torch_load(trained.get("token", "target"))
    state["cfg"]["model"].arch = "transformer"
    torch.save(state, tmp_path / "dense.pt")
    status, _, err = run_extract(capsys, "--checkpoint", str(tmp_path / "dense.pt"), "--lang-pair", "en-de", "--report-only")
    assert status == 2 and "not a TaskMoE checkpoint (architecture 'transformer')" in err


def test_extract_unknown_pair_lists_the_known_ones(capsys, trained):
    status, _, err = run_extract(capsys, "--checkpoint", trained.get("token", "target"), "--lang-pair", "en-ja", "--report-only")
    assert status == 2
    assert "unknown language pair en-ja; the model knows en-de,de-en,en-fr,fr-en,en-ru,ru-en" in err


def test_extract_with_nothing_to_strip(capsys, trained, tmp_path):
    token_token = trained.get("token", "token", 1)
    status, _, err = run_extract(capsys, "--checkpoint", token_token, "--lang-pair", "en-de", "--output", str(tmp_path / "x.pt"))
    assert status == 2 and "nothing to strip" in err and "--plain-copy" in err
    assert not (tmp_path / "x.pt").exists()
    status, _, _ = run_extract(capsys, "--checkpoint", token_token, "--lang-pair", "en-de", "--output", str(tmp_path / "x.pt"), "--plain-copy")
    assert status == 0
    assert safe_torch_load(str(tmp_path / "x.pt"))["model"].keys() == safe_torch_load(token_token)["model"].keys()


def test_extract_refuses_to_overwrite_and_reports_unwritable_folders(capsys, trained, tmp_path):
    full = trained.get("token", "target")
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    status, _, err = run_extract(capsys, "--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "taken.pt"))
    assert status == 2 and "exists; pass --force" in err
    assert (tmp_path / "taken.pt").read_bytes() == b"keep me"
    status, _, err = run_extract(capsys, "--checkpoint", full, "--all-lang-pairs", "--output-dir", str(tmp_path / "taken.pt" / "sub"))
    assert status == 2 and "cannot write to" in err
    status, _, err = run_extract(capsys, "--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "taken.pt"), "--force")
    assert status == 0 and (tmp_path / "taken.pt").read_bytes() != b"keep me"


def test_extract_report_only_writes_nothing(capsys, trained, tmp_path):
    before = set(os.listdir(os.path.dirname(trained.get("token", "target"))))
    status, out, _ = run_extract(capsys, "--checkpoint", trained.get("token", "target"), "--all-lang-pairs", "--report-only")
    assert status == 0 and out.count("decoder.1") == 6
    assert set(os.listdir(os.path.dirname(trained.get("token", "target")))) == before


def test_extract_never_leaves_a_half_written_file(capsys, trained, tmp_path, monkeypatch):
    def failing_save(obj, stream, *args, **kwargs):
        stream.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    status, _, err = run_extract(capsys, "--checkpoint", trained.get("token", "target"), "--lang-pair", "en-de",
                                 "--output", str(tmp_path / "en-de.pt"))
    assert status == 2 and f"cannot write {tmp_path / 'en-de.pt'}: No space left on device (ENOSPC)" in err
    assert os.listdir(tmp_path) == []


def test_extract_refuses_an_already_extracted_checkpoint(capsys, trained, tmp_path):
    full = trained.get("token", "target")
    assert run_extract(capsys, "--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"))[0] == 0
    status, _, err = run_extract(capsys, "--checkpoint", str(tmp_path / "en-de.pt"), "--lang-pair", "en-de", "--report-only")
    assert status == 2 and "already extracted for en-de" in err


def test_extract_cli_prints_one_line_without_traceback(trained):
    result = run_in_process(python_module("taskmoe_fairseq.extract", "--checkpoint", trained.get("token", "target"), "--lang-pair", "xx-yy", "--report-only"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("taskmoe_fairseq.extract: error: unknown language pair xx-yy")
    assert "Traceback" not in result.stderr


def test_extract_output_problems_are_one_line_and_never_touch_the_input(capsys, trained, tmp_path):
    full = trained.get("token", "target")
    before = open(full, "rb").read()
    (tmp_path / "folder").mkdir()
    status, _, err = run_extract(capsys, "--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "folder"), "--force")
    assert status == 2 and "is a folder" in err and err.count("\n") == 1
    status, _, err = run_extract(capsys, "--checkpoint", full, "--lang-pair", "en-de", "--output", full, "--force")
    assert status == 2 and "is the input checkpoint, which is never modified" in err
    link = tmp_path / "same.pt"
    os.symlink(full, link)
    status, _, err = run_extract(capsys, "--checkpoint", str(link), "--lang-pair", "en-de", "--output", full, "--force")
    assert status == 2 and "is the input checkpoint" in err
    (tmp_path / "file").write_bytes(b"x")
    status, _, err = run_extract(capsys, "--checkpoint", full, "--all-lang-pairs", "--output-dir", str(tmp_path / "file"))
    assert status == 2 and "is a file; pass a folder" in err
    assert open(full, "rb").read() == before


def test_extract_syncs_the_file_before_renaming_it(capsys, trained, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    status, _, _ = run_extract(capsys, "--checkpoint", trained.get("token", "target"), "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"))
    assert status == 0
    assert events[:2] == ["fsync", "replace"]  # the checkpoint, then its report
    assert events.count("replace") == 2 + 5  # and the 4 dictionaries and spm.model beside it (extract/assets.py)


def test_extract_maps_the_checkpoint_instead_of_reading_it(capsys, trained, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    status, _, _ = run_extract(capsys, "--checkpoint", trained.get("token", "target"), "--lang-pair", "en-de", "--report-only")
    assert status == 0 and calls and all(call.get("mmap") and call.get("weights_only") for call in calls)


@pytest.mark.parametrize("tool", ["fairseq-generate", "fairseq-interactive"])
def test_an_extracted_checkpoint_asked_for_another_pair_stops_with_one_line(tool, trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    assert extract.main(["--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt")]) == 0
    command = generate_command(data_dir, str(tmp_path / "en-de.pt"), "de-en", beam=1)
    stdin = None
    if tool == "fairseq-interactive":
        command = ["fairseq-interactive", *command[1:command.index("--gen-subset")], "--cpu"]
        stdin = "▁hallo\n"
    result = run_in_process(command, check=False, stdin=stdin)
    assert_one_line_error(result, "is the en-de sub-network; it cannot translate de-en")
    assert "H-" not in result.stdout


def test_usage_errors_are_exceptions_a_server_can_catch():
    from taskmoe_fairseq.errors import TaskMoeError

    assert issubclass(TaskMoeError, Exception) and not issubclass(TaskMoeError, SystemExit)


def test_the_task_with_fairseqs_transformer_is_one_line(train):
    """fairseq's ``transformer`` takes no language ids: was a TypeError on the first batch (issue 28)."""
    command = with_option(without(train, "--encoder-moe-routing", "--decoder-moe-routing"), "--arch", "transformer")
    result = run_in_process(command, check=False)
    assert_one_line_error(result, "taskmoe-fairseq: error: --arch transformer takes no language ids, which every batch "
                                  "of --task multilingual_translation_taskmoe carries: use --arch taskmoe_transformer")
    assert result.returncode == 1 and not os.path.exists(train[train.index("--save-dir") + 1] + "/checkpoint_last.pt")


def test_a_pipe_or_folder_given_as_a_checkpoint_is_one_line_not_a_hang(trained, tmp_path, capsys):
    """A named pipe as --checkpoint / --model / --auth-token-file used to block its reader forever
    (extract, translate, serve's token); the server called it missing (a tester's findings)."""
    from taskmoe_fairseq import extract, translate
    from taskmoe_fairseq.serve import cli as serve_cli

    pipe = str(tmp_path / "model.pt")
    os.mkfifo(pipe)
    checkpoint = trained.get("token", "target")
    for run, args, needle in (
        (extract.main, ["--checkpoint", pipe, "--lang-pair", "en-de", "--output", str(tmp_path / "o.pt")], "is not a regular file"),
        (translate.main, ["--model", pipe, "--lang-pair", "en-de"], "is neither a checkpoint file nor a CTranslate2 folder"),
        (serve_cli.cli, ["--checkpoint", pipe], "is not a regular file"),
        (serve_cli.cli, ["--checkpoint", checkpoint, "--auth-token-file", pipe], "is not a regular file"),
        (serve_cli.cli, ["--checkpoint", checkpoint, "--lang-pairs", ",,"], "names no pair"),
    ):
        assert run(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
