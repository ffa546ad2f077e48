"""taskmoe_fairseq.files, the one implementation of atomic, durable writes (the plugin's
commands, the data scripts and the benchmarks all write through it)."""

import os

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
    with pytest.raises(OSError, match="disk full"):
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
