"""taskmoe_fairseq.files, the one implementation of atomic, durable writes (the plugin's
commands, the data scripts and the benchmarks all write through it)."""

import os
import resource
import stat
import subprocess
import sys

import pytest

from taskmoe_fairseq import files
from taskmoe_fairseq.errors import TaskMoeError


@pytest.fixture
def events(monkeypatch):
    """The order of fsync and replace calls."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    return calls


def test_atomic_write_fsyncs_before_replacing_and_leaves_no_temporary(tmp_path, events):
    path = tmp_path / "out.txt"
    files.atomic_write_text(str(path), "néw")
    assert path.read_bytes() == "néw".encode("utf-8")
    assert events[:2] == ["fsync", "replace"]
    assert os.listdir(str(tmp_path)) == ["out.txt"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # the umask's mode, not mkstemp's 0600


def test_failed_atomic_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(TaskMoeError, match=f"cannot write {path}: disk full"):
        files.atomic_write_lines(str(path), ["new"])
    assert path.read_bytes() == b"old"
    assert os.listdir(str(tmp_path)) == ["out.txt"]


def test_a_writer_that_fails_half_way_leaves_nothing(tmp_path):
    def half(stream):
        stream.write(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        files.atomic_write(str(tmp_path / "out.bin"), half)
    assert os.listdir(str(tmp_path)) == []


def test_an_unwritable_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(TaskMoeError, match="choose a writable output folder"):
        files.atomic_write(str(tmp_path / "file" / "out.txt"), b"data")


def test_copy_and_move_of_a_file_sync_then_rename(tmp_path, events):
    source = tmp_path / "a.txt"
    source.write_bytes(b"payload")
    files.atomic_copy(str(source), str(tmp_path / "b.txt"))
    assert (tmp_path / "b.txt").read_bytes() == b"payload" and source.exists()
    del events[:]
    files.atomic_move(str(source), str(tmp_path / "c.txt"))
    assert events[:2] == ["fsync", "replace"]
    assert sorted(os.listdir(str(tmp_path))) == ["b.txt", "c.txt"]


def test_a_folder_moves_whole(tmp_path):
    building = tmp_path / ".building"
    (building / "sub").mkdir(parents=True)
    (building / "sub" / "x.txt").write_bytes(b"x")
    files.atomic_move(str(building), str(tmp_path / "done"))
    assert (tmp_path / "done" / "sub" / "x.txt").read_bytes() == b"x" and not building.exists()


def test_only_a_regular_file_is_replaced(tmp_path):
    """A rename would put a regular file where a symbolic link, a device or a pipe was."""
    target = tmp_path / "target.pt"
    target.write_bytes(b"kept")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    for path, kind in ((link, "a symbolic link"), (fifo, "a named pipe"), (tmp_path, "a folder")):
        with pytest.raises(TaskMoeError, match=f"^{path} is {kind}; the output must be a regular file or a new path"):
            files.atomic_write(str(path), b"new")
    with pytest.raises(TaskMoeError, match="is a symbolic link"):
        files.atomic_move(str(target), str(link))
    source = tmp_path / "folder"
    source.mkdir()
    folder_link = tmp_path / "folder-link"
    folder_link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TaskMoeError, match="is a symbolic link"):
        files.atomic_move(str(source), str(folder_link))
    assert os.path.islink(link) and os.path.islink(folder_link) and target.read_bytes() == b"kept"
    assert sorted(os.listdir(tmp_path)) == ["fifo", "folder", "folder-link", "link.pt", "target.pt"]


def private_null_device(folder):
    """A character device like /dev/null (1, 3) made in ``folder``: the tests never aim a writer at the
    system's own nodes (the old code replaced them). Making one needs CAP_MKNOD: skipped, with the
    reason shown, where the tests run without it."""
    path = os.path.join(str(folder), "null")
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a character device needs CAP_MKNOD")
    return path


def test_a_character_device_is_not_replaced(tmp_path):
    device = private_null_device(tmp_path)
    with pytest.raises(TaskMoeError, match=f"^{device} is a character device; the output must be a regular file"):
        files.atomic_write(device, b"new")
    assert stat.S_ISCHR(os.lstat(device).st_mode) and os.listdir(str(tmp_path)) == ["null"]


def limited_process(code, limit=65536):
    """``python -c code`` with a file-size limit of ``limit`` bytes (Python ignores SIGXFSZ: writes
    past it fail with EFBIG)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )


@pytest.mark.slow
def test_a_write_error_names_the_path_and_the_cause_even_through_torchs_writer(tmp_path):
    """torch's zip writer turns the OSError of a write into ``RuntimeError: ... unexpected pos``;
    atomic_write reports the OSError, and leaves neither the temporary file nor the old file changed."""
    old = tmp_path / "old.pt"
    old.write_bytes(b"old")
    code = f"""
import torch
from taskmoe_fairseq import files
from taskmoe_fairseq.errors import TaskMoeError
for path, data in (({str(tmp_path / "new.pt")!r}, lambda stream: torch.save(torch.zeros(100000), stream)),
                   ({str(old)!r}, b"x" * 100000)):
    try:
        files.atomic_write(path, data)
    except TaskMoeError as error:
        print(error)
"""
    result = limited_process(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"cannot write {path}: File too large (EFBIG); free space (or raise the file-size limit) or choose another output"
        for path in (tmp_path / "new.pt", old)
    ]
    assert sorted(os.listdir(tmp_path)) == ["old.pt"] and old.read_bytes() == b"old"
