"""One reading of a checkpoint's saved options (taskmoe_fairseq.models.checkpoint_config), used by
extract, export, translate, serve and the trainer's identity check: its one-line refusals, and the
same refusal from every command for the same file."""

import argparse

import pytest
import torch

from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.models.checkpoint_config import read_config, saved_options
from taskmoe_fairseq.safe_loading import safe_torch_load


def taskmoe(**options):
    return argparse.Namespace(arch="taskmoe_transformer", lang_pairs="en-de,de-en", **options)


def test_cfg_and_legacy_args_are_read_the_same_way():
    model, task = taskmoe(), argparse.Namespace(data="bin")
    assert saved_options({"model": {}, "cfg": {"model": model, "task": task}}) == (model, task)
    assert saved_options({"model": {}, "args": model}) == (model, model)  # legacy: one namespace for both
    assert saved_options({"model": {}, "cfg": {"model": model}, "args": None}) == (model, None)
    assert saved_options("not a dict") == (None, None)
    config = read_config({"model": {}, "cfg": {"model": vars(taskmoe()), "task": task}}, "m.pt", "export")
    assert config.model == taskmoe() and config.task is task and config.extracted_pair is None


@pytest.mark.parametrize("state, message", [
    (["a list"], "m.pt: not a fairseq checkpoint (no 'model' entry)"),
    ({"cfg": {"model": taskmoe()}}, "m.pt: not a fairseq checkpoint (no 'model' entry)"),
    ({"model": {}, "cfg": {"model": argparse.Namespace(arch="transformer")}},
     "m.pt: not a TaskMoE checkpoint (architecture 'transformer'); translate works on models trained with "
     "--arch taskmoe_transformer"),
    ({"model": {}}, "m.pt: not a TaskMoE checkpoint (architecture 'None'); translate works on models trained with "
                    "--arch taskmoe_transformer"),
    ({"model": {}, "cfg": {"model": taskmoe()}, "expert_parallel": {"size": 2}},
     "m.pt is one file of an expert-parallel checkpoint (its experts are in the -rank-N.pt shards): consolidate it "
     "first (python -m taskmoe_fairseq.consolidate --checkpoint-dir DIR --output full.pt) and translate full.pt"),
])
def test_each_refusal_is_one_line(state, message):
    with pytest.raises(TaskMoeError) as error:
        read_config(state, "m.pt", "translate")
    assert error.value.message == message


def test_an_extracted_checkpoint_is_refused_only_where_the_full_one_is_needed():
    state = {"model": {}, "cfg": {"model": taskmoe(moe_extracted_lang_pair="en-de")}}
    assert read_config(state, "m.pt", "export").extracted_pair == "en-de"
    with pytest.raises(TaskMoeError, match=r"^m.pt: already extracted for en-de; extract from the full checkpoint$"):
        read_config(state, "m.pt", "extract", full=True)


def test_the_shared_file_is_accepted_only_where_its_shards_are_read():
    shared = {"model": {}, "cfg": {"model": taskmoe()}, "expert_parallel": {"size": 2}}
    assert read_config(shared, "ck-shared.pt", "extract", shared_file=True).model == taskmoe()
    shard = {"model": {}, "expert_parallel": {"size": 2, "shard": 1}}
    with pytest.raises(TaskMoeError) as error:
        read_config(shard, "d/ck-rank-1.pt", "extract", shared_file=True)
    assert error.value.message == ("d/ck-rank-1.pt is one file of an expert-parallel checkpoint (its experts are in the "
                                   "-rank-N.pt shards): extract from its shared file d/ck-shared.pt, which reads the "
                                   "shards it needs")


@pytest.fixture(scope="module")
def odd_files(trained, tmp_path_factory):
    """(an expert shard, its shared file, a checkpoint of another architecture) of the token/target model."""
    from taskmoe_fairseq.expert_parallel import sharded_checkpoint

    folder = tmp_path_factory.mktemp("odd")
    full = safe_torch_load(trained.get("token", "target"))
    stem = str(folder / "checkpoint_last")
    sharded_checkpoint.save_sharded(full["model"], full["cfg"]["model"], stem, 2)
    full["cfg"]["model"].arch = "transformer"
    torch.save(full, folder / "dense.pt")
    return sharded_checkpoint.shard_path(stem, 1), sharded_checkpoint.shared_path(stem), str(folder / "dense.pt")


def commands():
    """tool -> (its entry point with one-line errors, the checkpoint option, the other options)."""
    from taskmoe_fairseq import extract, translate
    from taskmoe_fairseq.export import cli as export_cli
    from taskmoe_fairseq.serve import cli as serve_cli

    return {
        "extract": (extract.main, "--checkpoint", ("--lang-pair", "en-de", "--report-only")),
        "export": (export_cli.main, "--checkpoint", ("--lang-pair", "en-de", "--output-dir", "{out}")),
        "translate": (translate.main, "--model", ("--lang-pair", "en-de")),
        "serve": (serve_cli.cli, "--checkpoint", ("--lang-pairs", "en-de")),
    }


TOOLS = ("export", "extract", "serve", "translate")


def refusal(tool, path, tmp_path, capsys):
    main, option, rest = commands()[tool]
    capsys.readouterr()
    status = main([option, path, *[arg.format(out=tmp_path / "out") for arg in rest]])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_command_names_an_expert_shard_and_the_way_out(tool, odd_files, tmp_path, capsys):
    """An expert shard (``-rank-N.pt``: experts, no config) was 'not a TaskMoE checkpoint
    (architecture 'None')' to extract, translate and serve; every command now says what it is."""
    shard, shared, _ = odd_files
    way_out = (f"extract from its shared file {shared}, which reads the shards it needs" if tool == "extract" else
               f"consolidate it first (python -m taskmoe_fairseq.consolidate --checkpoint-dir DIR --output full.pt) "
               f"and {tool} full.pt")
    assert refusal(tool, shard, tmp_path, capsys) == (
        f"taskmoe_fairseq.{tool}: error: {shard} is one file of an expert-parallel checkpoint (its experts are in the "
        f"-rank-N.pt shards): {way_out}")


@pytest.mark.parametrize("tool", TOOLS)
def test_every_command_names_another_architecture(tool, odd_files, tmp_path, capsys):
    dense = odd_files[2]
    assert refusal(tool, dense, tmp_path, capsys).startswith(
        f"taskmoe_fairseq.{tool}: error: {dense}: not a TaskMoE checkpoint (architecture 'transformer'); ")
