"""Issue 28, every command that writes (extract, export, consolidate, examples/data/binarize.py):
``--force`` replaces only what the command itself writes (never its input, never a file or folder it
did not write), only regular files are replaced (never a symbolic link or a device node), and a
failed write (here: past a file-size limit, EFBIG) is one line naming the path and the cause, exit
status 2, with nothing left behind."""

import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys

import pytest

from cli_helpers import ENV, REPO, python_module, run_main
from test_files import private_null_device
from taskmoe_fairseq.expert_parallel import sharded_checkpoint
from taskmoe_fairseq.safe_loading import safe_torch_load

FILE_SIZE_LIMIT = 1 << 20  # bytes: below every checkpoint or model.bin written here (>= 5 MB)


def digest(path):
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def tree(folder):
    """{relative path: sha256 (or the link's target)} of everything under ``folder``."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[key] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                found[key] = digest(path)
    return found


def one_line(result, prog, *needles):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: " if prog else "error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def limited_run(module, *args):
    """A real process of ``python -m module args`` whose files may not grow past FILE_SIZE_LIMIT."""
    return subprocess.run(
        python_module(module, *args), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT)),
    )


@pytest.fixture
def checkpoint_copy(trained, tmp_path):
    """A token/target checkpoint copied into ``tmp_path/work``, beside an unrelated file."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(trained.get("token", "target"), work / "model.pt")
    (work / "notes.txt").write_text("mine\n")
    return work


# ---- extract


def test_extract_never_replaces_what_it_did_not_write(checkpoint_copy, tmp_path):
    work = checkpoint_copy
    (work / "en-de.report.json").write_text("my own notes\n")
    before = tree(work)
    args = ("--checkpoint", str(work / "model.pt"), "--lang-pair", "en-de")

    # the report beside --output is an output too: not replaced without --force ...
    result = run_main("taskmoe_fairseq.extract", *args, "--output", str(work / "en-de.pt"), check=False)
    one_line(result, "taskmoe_fairseq.extract", f"{work / 'en-de.report.json'} exists; pass --force")
    # ... and with --force only if extract wrote it
    result = run_main("taskmoe_fairseq.extract", *args, "--output", str(work / "en-de.pt"), "--force", check=False)
    one_line(result, "taskmoe_fairseq.extract", "is not a report extract wrote")
    result = run_main("taskmoe_fairseq.extract", *args, "--output-dir", str(work), "--force", check=False)
    one_line(result, "taskmoe_fairseq.extract", "is not a report extract wrote")
    # the input, or its report name, is never an output
    result = run_main("taskmoe_fairseq.extract", *args, "--output", str(work / "model.pt"), "--force", check=False)
    one_line(result, "taskmoe_fairseq.extract", "is the input checkpoint, which is never modified")
    assert tree(work) == before

    # an extract report is replaced by --force
    os.remove(work / "en-de.report.json")
    out = tmp_path / "out"
    run_main("taskmoe_fairseq.extract", *args, "--output-dir", str(out))
    run_main("taskmoe_fairseq.extract", *args, "--output-dir", str(out), "--force")
    written = sorted(os.listdir(out))
    assert [name for name in written if not name.startswith("dict.")] == ["en-de.pt", "en-de.report.json", "spm.model"]
    assert [name for name in written if name.startswith("dict.")]  # the model's dictionaries beside it


def test_extract_refuses_a_device_or_a_link_as_output(checkpoint_copy, tmp_path):
    work = checkpoint_copy
    (tmp_path / "link.pt").symlink_to(work / "notes.txt")
    device = private_null_device(tmp_path)  # never the system's /dev/null: the old code replaced it
    before = tree(tmp_path)
    args = ("--checkpoint", str(work / "model.pt"), "--lang-pair", "en-de", "--force")
    for output, kind in ((device, "a character device"), (str(tmp_path / "link.pt"), "a symbolic link")):
        result = run_main("taskmoe_fairseq.extract", *args, "--output", output, check=False)
        one_line(result, "taskmoe_fairseq.extract", f"{output} is {kind}; the --output file must be a regular file or a new path")
    assert tree(tmp_path) == before and stat.S_ISCHR(os.lstat(device).st_mode)


def test_extract_from_a_sharded_checkpoint_never_writes_over_a_shard(trained, tmp_path):
    full = safe_torch_load(trained.get("token", "target"))
    stem = str(tmp_path / "checkpoint_last")
    sharded_checkpoint.save_sharded(full["model"], full["cfg"]["model"], stem, 2)
    before = tree(tmp_path)
    for shard in (0, 1):
        result = run_main("taskmoe_fairseq.extract", "--checkpoint", sharded_checkpoint.shared_path(stem), "--lang-pair", "en-de",
                          "--output", sharded_checkpoint.shard_path(stem, shard), "--force", check=False)
        one_line(result, "taskmoe_fairseq.extract", "is the input checkpoint, which is never modified")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_extract_write_error_is_one_line_and_leaves_nothing(checkpoint_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = limited_run("taskmoe_fairseq.extract", "--checkpoint", str(checkpoint_copy / "model.pt"),
                         "--lang-pair", "en-de", "--output", str(out / "en-de.pt"))
    one_line(result, "taskmoe_fairseq.extract", f"cannot write {out / 'en-de.pt'}: File too large (EFBIG)")
    assert os.listdir(out) == []


# ---- export


def test_export_force_replaces_only_an_earlier_export(trained, data_dir, tmp_path, monkeypatch):
    """``--output-dir DIR --force`` used to delete DIR whole: the input checkpoint and unrelated files."""
    full = trained.get("target", "target", max_update=300)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(full, work / "model.pt")
    (work / "notes.txt").write_text("mine\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    earlier = tmp_path / "earlier"  # what an earlier export left: its spm.model is given as the input
    earlier.mkdir()
    (earlier / "taskmoe_export.json").write_text("{}\n")
    shutil.copy(os.path.join(data_dir, "spm.model"), earlier / "spm.model")
    (tmp_path / "link").symlink_to(other)
    before = tree(tmp_path)

    def export(*args):
        return run_main("taskmoe_fairseq.export", "--checkpoint", str(work / "model.pt"), "--lang-pair", "en-de",
                        *args, "--force", check=False)

    one_line(export("--output-dir", str(work)), "taskmoe_fairseq.export", f"holds the input {work / 'model.pt'} (--checkpoint)")
    monkeypatch.chdir(work)
    one_line(export("--output-dir", "."), "taskmoe_fairseq.export", "(--checkpoint), which is never modified")
    monkeypatch.chdir(tmp_path)
    one_line(export("--output-dir", str(other)), "taskmoe_fairseq.export",
             f"holds {other / 'notes.txt'}, which export did not write; --force replaces only an earlier export")
    one_line(export("--output-dir", str(earlier), "--spm-model", str(earlier / "spm.model")), "taskmoe_fairseq.export",
             f"holds the input {earlier / 'spm.model'} (--spm-model)")
    one_line(export("--output-dir", str(tmp_path / "link")), "taskmoe_fairseq.export", "is a symbolic link")
    one_line(export("--output-dir", str(work / "notes.txt")), "taskmoe_fairseq.export", "exists and is not a folder")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_export_write_error_is_one_line_and_leaves_nothing(trained, tmp_path):
    full = trained.get("target", "target", max_update=300)
    run_main("taskmoe_fairseq.extract", "--checkpoint", full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"),
             "--merge-experts")
    before = tree(tmp_path)
    result = limited_run("taskmoe_fairseq.export", "--checkpoint", str(tmp_path / "en-de.pt"), "--output-dir", str(tmp_path / "ct2"))
    one_line(result, "taskmoe_fairseq.export", f"cannot write {tmp_path / 'ct2'}: File too large (EFBIG)")
    assert tree(tmp_path) == before


# ---- consolidate


@pytest.fixture
def sharded(trained, tmp_path):
    full = safe_torch_load(trained.get("token", "target"))
    stem = str(tmp_path / "ckpt" / "checkpoint_last")
    sharded_checkpoint.save_sharded(full["model"], full["cfg"]["model"], stem, 2)
    return stem


def test_consolidate_never_writes_over_its_input_or_a_link(sharded, tmp_path):
    (tmp_path / "link.pt").symlink_to(tmp_path / "elsewhere.pt")
    before = tree(tmp_path)
    folder = os.path.dirname(sharded)
    for output in (sharded_checkpoint.shared_path(sharded), sharded_checkpoint.shard_path(sharded, 1)):
        result = run_main("taskmoe_fairseq.consolidate", "--checkpoint-dir", folder, "--output", output, "--force", check=False)
        one_line(result, "taskmoe_fairseq.consolidate", "is one of the input files, which are never modified")
    result = run_main("taskmoe_fairseq.consolidate", "--checkpoint-dir", folder, "--output", str(tmp_path / "link.pt"),
                      "--force", check=False)
    one_line(result, "taskmoe_fairseq.consolidate", "is a symbolic link; the --output must be a regular file")
    # another set's files in the folder (checkpoint_best's): not inputs, but not consolidate's either
    other = os.path.join(folder, "checkpoint_best")
    for path in (sharded_checkpoint.shared_path(sharded), sharded_checkpoint.shard_path(sharded, 0)):
        shutil.copyfile(path, path.replace(sharded, other))
    before = tree(tmp_path)
    for output in (sharded_checkpoint.shared_path(other), sharded_checkpoint.shard_path(other, 0)):
        result = run_main("taskmoe_fairseq.consolidate", "--checkpoint-dir", folder, "--output", output, "--force", check=False)
        one_line(result, "taskmoe_fairseq.consolidate", "is a file of an expert-parallel checkpoint, which consolidate never replaces")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_consolidate_write_error_is_one_line_and_leaves_nothing(sharded, tmp_path):
    before = tree(tmp_path)
    result = limited_run("taskmoe_fairseq.consolidate", "--checkpoint-dir", os.path.dirname(sharded),
                         "--output", str(tmp_path / "full.pt"))
    one_line(result, "taskmoe_fairseq.consolidate", f"cannot write {tmp_path / 'full.pt'}: File too large (EFBIG)")
    assert tree(tmp_path) == before


# ---- examples/data/binarize.py

BINARIZE = os.path.join(REPO, "examples", "data", "binarize.py")


def binarize(*args, limit=None):
    """A real process of binarize.py (``limit``: a file-size limit in bytes)."""
    return subprocess.run(
        [sys.executable, BINARIZE, *args], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600,
        preexec_fn=None if limit is None else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )


@pytest.fixture
def raw_en_de(data_dir, tmp_path):
    """The en-de raw text of the bundled fixture (400 training lines), in ``tmp_path/raw``."""
    raw = tmp_path / "raw"
    raw.mkdir()
    source = os.path.join(os.path.dirname(data_dir), "raw")
    for name in os.listdir(source):
        if ".en-de." in name:
            shutil.copy(os.path.join(source, name), raw / name)
    return raw


def test_binarize_force_redoes_only_its_own_outputs(raw_en_de, data_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "dict.txt").write_text("a 1\n")
    (mine / "notes.txt").write_text("mine\n")
    before = tree(tmp_path)
    result = binarize("--raw", str(raw_en_de), "--out", str(mine), "--force")
    one_line(result, None, f"holds {mine / 'notes.txt'}, which binarize.py did not write; --force redoes only")
    result = binarize("--raw", str(raw_en_de), "--out", str(tmp_path), "--force")
    one_line(result, None, f"--out {tmp_path} holds the --raw input {raw_en_de}, which is never modified")
    assert tree(tmp_path) == before
    # what binarize.py wrote (the tests' data folder, leftovers of a killed run included) passes
    sys.path.insert(0, os.path.dirname(BINARIZE))
    import binarize as script

    script.check_force(str(raw_en_de), data_dir)
    os.mkdir(tmp_path / "again")
    os.mkdir(tmp_path / "again" / ".tmp-spm.x")
    (tmp_path / "again" / "spm.model").write_bytes(b"x")
    script.check_force(str(raw_en_de), str(tmp_path / "again"))


@pytest.mark.slow
def test_binarize_write_error_is_one_line_and_leaves_nothing(raw_en_de, tmp_path):
    out = tmp_path / "bin"
    result = binarize("--raw", str(raw_en_de), "--out", str(out), "--vocab-size", "300", limit=16384)
    line = one_line(result, None, f"cannot write {out}{os.sep}", ": File too large (EFBIG)")
    assert "Traceback" not in result.stderr and line
    assert os.listdir(out) == []


@pytest.mark.slow
def test_binarize_never_leaves_two_runs_mixed(data_dir, tmp_path):
    """An --out holding a run with other settings: without --force binarize.py redid part of it and
    left the previous run's other outputs (another pair, binarized with the old dictionary) beside the
    new dictionary (a tester's finding). Now it refuses; with --force the old outputs go."""
    source = os.path.join(os.path.dirname(data_dir), "raw")
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in os.listdir(source):
        if ".en-de." in name or ".en-fr." in name:
            shutil.copy(os.path.join(source, name), raw / name)
    out = tmp_path / "bin"
    result = binarize("--raw", str(raw), "--out", str(out), "--vocab-size", "300", "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    before = tree(tmp_path)
    result = binarize("--raw", str(raw), "--out", str(out), "--langs", "de", "--vocab-size", "290", "--workers", "1")
    one_line(result, None, f"{out} holds a previous run with other settings (langs, vocab_size); pass --force")
    assert tree(tmp_path) == before
    result = binarize("--raw", str(raw), "--out", str(out), "--langs", "de", "--vocab-size", "290", "--workers", "1",
                      "--force")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [name for name in os.listdir(out) if ".en-fr." in name]  # the previous run's other pair is gone
