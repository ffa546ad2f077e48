"""Issue 28: a checkpoint whose zip directory is intact but one tensor record is cut short. torch's
memory-mapped load (``mmap=True``: extract, translate, serve, the expert shards) reads a storage at
its record's offset and never compares sizes, so such a file used to pass: extract wrote a model
with the following records' bytes as weights, translate died in a RuntimeError traceback. Every
load path now stops with one line naming the file and the record."""

import io
import os
import shutil
import zipfile

import pytest
import torch

from cli_helpers import TASK_ARGS, generate_command, python_module, run_main, run_in_process, train_command
from taskmoe_fairseq import safe_loading
from taskmoe_fairseq.expert_parallel import sharded_checkpoint
from taskmoe_fairseq.errors import TaskMoeError

MESSAGE = "the checkpoint is truncated or corrupt: tensor record"


def truncated_copy(source, path, keep=0.5):
    """Copy the checkpoint ``source`` to ``path`` with one tensor record (the largest but the last)
    cut to ``keep`` of its bytes, rewritten as a consistent zip whose records are 64-byte aligned as
    torch writes them (so torch's mapped reader accepts it). Returns the record's name."""
    with zipfile.ZipFile(source) as old:
        infos = old.infolist()
        tensors = [info for info in infos if "/data/" in info.filename and info.filename.split("/")[-1].isdigit()]
        cut = max(tensors[:-1], key=lambda info: info.file_size).filename
        with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as new:
            for info in infos:
                data = old.read(info.filename)
                if info.filename == cut:
                    data = data[: int(len(data) * keep)]
                record = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                start = raw.tell() + 30 + len(info.filename.encode()) + 4  # local header, name, extra's header
                padding = -start % 64
                record.extra = b"FB" + padding.to_bytes(2, "little") + b"Z" * padding
                new.writestr(record, data)
    return cut


def assert_one_line(result, prog, path):
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if MESSAGE in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {path}: "), result.stderr[-3000:]


@pytest.fixture(scope="module")
def truncated(trained, tmp_path_factory):
    """(full checkpoint, its copy with a record cut short, the record's name)."""
    full = trained.get("token", "target")
    path = str(tmp_path_factory.mktemp("truncated") / "checkpoint_last.pt")
    record = truncated_copy(full, path)
    # the fault: torch's mapped load accepts the file, and a tensor holds other records' bytes
    mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    original = torch.load(full, map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(mapped[key], original[key]) for key in original)
    return full, path, record


def test_the_safe_loader_names_the_record_mapped_or_not(truncated):
    _, path, record = truncated
    for mmap in (True, False):
        with pytest.raises(TaskMoeError, match=f"^{path}: {MESSAGE} {record} holds [0-9,]+ bytes, its storage needs"):
            safe_loading.safe_torch_load(path, mmap=mmap)


def test_extract_and_export_refuse_it_and_write_nothing(truncated, tmp_path):
    _, path, _ = truncated
    result = run_main("taskmoe_fairseq.extract", "--checkpoint", path, "--lang-pair", "en-de",
                      "--output", str(tmp_path / "en-de.pt"), check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"taskmoe_fairseq.extract: error: {path}: {MESSAGE}")
    result = run_main("taskmoe_fairseq.export", "--checkpoint", path, "--lang-pair", "en-de",
                      "--output-dir", str(tmp_path / "ct2"), check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"taskmoe_fairseq.export: error: {path}: {MESSAGE}")
    assert os.listdir(tmp_path) == []


def test_translate_serve_and_the_hub_refuse_it(truncated, data_dir):
    from fairseq import hub_utils

    from taskmoe_fairseq.serve.shared_weights import SharedWeights
    from taskmoe_fairseq.translate import load_translator

    _, path, _ = truncated
    for load in (lambda: load_translator(path, "en-de", data_dir=data_dir),
                 lambda: SharedWeights(path, data_dir=data_dir),
                 lambda: hub_utils.from_pretrained(os.path.dirname(path), checkpoint_file=os.path.basename(path),
                                                   data_name_or_path=data_dir)):
        with pytest.raises(TaskMoeError, match=f"^{path}: {MESSAGE}"):
            load()


def test_translate_is_one_line_from_the_command(truncated, data_dir):
    _, path, _ = truncated
    result = run_in_process(python_module("taskmoe_fairseq.translate", "--model", path, "--lang-pair", "en-de",
                                     "--data-dir", data_dir), check=False, stdin="hello\n")
    assert result.returncode == 2
    assert_one_line(result, "taskmoe_fairseq.translate", path)


def test_fairseq_generate_interactive_and_train_refuse_it_in_one_line(truncated, data_dir, tmp_path):
    _, path, _ = truncated
    interactive = ["fairseq-interactive", data_dir, *TASK_ARGS, "--source-lang", "en", "--target-lang", "de",
                   "--path", path, "--cpu"]
    train = train_command(data_dir, str(tmp_path / "ckpt"), "token", "target", 1) + ["--finetune-from-model", path]
    for command, stdin in ((generate_command(data_dir, path, "en-de", beam=1), None), (interactive, "hello\n"), (train, None)):
        assert_one_line(run_in_process(command, check=False, stdin=stdin), "taskmoe-fairseq", path)


def test_a_received_checkpoint_is_checked_too(truncated):
    """Rank 0's broadcast copy goes through fairseq.distributed.utils' torch.load on a buffer."""
    from fairseq.distributed import utils as distributed_utils

    _, path, _ = truncated
    with open(path, "rb") as stream:
        buffer = io.BytesIO(stream.read())
    with pytest.raises(TaskMoeError, match=f"^the received checkpoint: {MESSAGE}"):
        distributed_utils.torch.load(buffer, map_location="cpu")


def test_expert_parallel_files_are_checked_on_consolidate_and_extract(truncated, tmp_path):
    full, _, _ = truncated
    state = safe_loading.safe_torch_load(full)
    stem = str(tmp_path / "ckpt" / "checkpoint_last")
    sharded_checkpoint.save_sharded(state["model"], state["cfg"]["model"], stem, 2)
    for broken in (sharded_checkpoint.shard_path(stem, 1), sharded_checkpoint.shared_path(stem)):
        shutil.copy(broken, str(tmp_path / "intact.pt"))
        truncated_copy(str(tmp_path / "intact.pt"), broken)
        result = run_main("taskmoe_fairseq.consolidate", "--checkpoint-dir", os.path.dirname(stem),
                          "--output", str(tmp_path / "full.pt"), check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"taskmoe_fairseq.consolidate: error: {broken}: {MESSAGE}")
        result = run_main("taskmoe_fairseq.extract", "--checkpoint", sharded_checkpoint.shared_path(stem),
                          "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"), check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"taskmoe_fairseq.extract: error: {broken}: {MESSAGE}")
        shutil.move(str(tmp_path / "intact.pt"), broken)
        assert not os.path.exists(tmp_path / "full.pt") and not os.path.exists(tmp_path / "en-de.pt")


def zeroed_copy(source, path, start_share=1 / 3, length=1 << 16):
    """Copy ``source`` to ``path`` with ``length`` bytes zeroed in place at ``start_share`` of the
    file (a page range lost in a crash or a bad copy): every size and the zip directory stay intact."""
    shutil.copy(source, path)
    size = os.path.getsize(path)
    with open(path, "r+b") as stream:
        stream.seek(int(size * start_share) // 4096 * 4096)
        stream.write(b"\0" * length)


CORRUPT = "the checkpoint is corrupt: record"


@pytest.mark.parametrize("start_share", [1 / 3, 2 / 3])
def test_a_copy_damaged_in_place_is_refused_on_every_path(trained, data_dir, tmp_path, start_share):
    """Sizes intact, bytes zeroed: the records' CRC-32 (torch writes one each) tells. Before, extract
    exited 0 writing the damaged weights and the server answered garbage with 200."""
    from taskmoe_fairseq.serve.shared_weights import SharedWeights
    from taskmoe_fairseq.translate import load_translator

    full = trained.get("token", "target")
    path = str(tmp_path / "checkpoint_last.pt")
    zeroed_copy(full, path, start_share)
    safe_loading.safe_torch_load(full, mmap=True)  # the intact file passes
    result = run_main("taskmoe_fairseq.extract", "--checkpoint", path, "--lang-pair", "en-de",
                      "--output", str(tmp_path / "out" / "en-de.pt"), check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"taskmoe_fairseq.extract: error: {path}: {CORRUPT}")
    assert not os.path.exists(tmp_path / "out" / "en-de.pt")
    for load in (lambda: load_translator(path, "en-de", data_dir=data_dir), lambda: SharedWeights(path, data_dir=data_dir)):
        with pytest.raises(TaskMoeError, match=f"^{path}: {CORRUPT}"):
            load()
    result = run_in_process(generate_command(data_dir, path, "en-de", beam=1), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert any(line.startswith(f"taskmoe-fairseq: error: {path}: {CORRUPT}") for line in result.stderr.splitlines())
