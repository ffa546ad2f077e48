"""A checkpoint's model is its language order and its MoE and size options: resuming
(a checkpoint in --save-dir, --restore-file) and fine-tuning (--finetune-from-model) with another
one stops with one line before anything is loaded or written (issue 28). fairseq-train runs
in-process through its entry point (``cli_helpers.run_in_process``: the line and the exit status
the excepthook gives; two torchrun ranks refuse together as real processes)."""

import os
import shutil

import pytest

from cli_helpers import LANGS, generate_command, run_in_process, run_main, train_command, train_in_process
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.models import identity

REORDERED = ",".join(reversed(LANGS.split(",")))  # ru,fr,de,en


def with_langs(command, langs):
    command = list(command)
    command[command.index("--langs") + 1] = langs
    return command


def start_from(mode, checkpoint, tmp_path):
    """(save dir, extra options) that make fairseq-train load ``checkpoint`` the ``mode`` way."""
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    if mode == "save-dir":
        shutil.copyfile(checkpoint, save_dir / "checkpoint_last.pt")
        return str(save_dir), ()
    copy = tmp_path / "given.pt"
    shutil.copyfile(checkpoint, copy)
    return str(save_dir), ({"restore-file": "--restore-file", "finetune": "--finetune-from-model"}[mode], str(copy))


def snapshot(folder):
    """Every file under ``folder`` and its bytes."""
    return {os.path.join(root, name): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


@pytest.mark.parametrize("mode", ["save-dir", "restore-file", "finetune"])
def test_another_language_order_is_refused(mode, trained, data_dir, tmp_path):
    save_dir, extra = start_from(mode, trained.get("token", "target"), tmp_path)
    before = snapshot(str(tmp_path))
    command = with_langs(train_command(data_dir, save_dir, "token", "target", 13, extra), REORDERED)
    with pytest.raises(TaskMoeError) as refused:
        train_in_process(command)
    assert str(refused.value).endswith(
        f"was trained with --langs {LANGS} but this run has --langs {REORDERED}; pass --langs {LANGS} "
        "(language ids and the language tags' dictionary rows follow its order)")
    assert snapshot(str(tmp_path)) == before  # nothing written, nothing changed


def test_appending_a_language_is_refused_until_a_feature_allows_it(trained, data_dir, tmp_path):
    save_dir, extra = start_from("save-dir", trained.get("token", "target"), tmp_path)
    command = with_langs(train_command(data_dir, save_dir, "token", "target", 13, extra), LANGS + ",ja")
    with pytest.raises(TaskMoeError, match=f"trained with --langs {LANGS} but this run has --langs {LANGS},ja"):
        train_in_process(command)
    # the one place a language-adding feature relaxes
    assert identity.language_order_change(["en", "de"], ["en", "de", "ja"])
    assert not identity.language_order_change(["en", "de"], ["en", "de", "ja"], allow_appended=True)
    assert identity.language_order_change(["en", "de"], ["de", "en", "ja"], allow_appended=True)


# (option, this run's value, the checkpoint's as the line shows it): other shapes (fairseq's size
# mismatch traceback before) and equal shapes with another meaning (silently accepted before)
CHANGES = [
    ("--moe-expert-count", "8", "--moe-expert-count 4"),
    ("--moe-top-k", "1", "--moe-top-k 2"),  # equal shapes
    ("--decoder-moe-routing", "source", "--decoder-moe-routing target"),  # equal shapes
    ("--encoder-moe-routing", "sentence", "--encoder-moe-routing token"),
    ("--decoder-moe-freq", "1", "--decoder-moe-freq 2"),
    ("--moe-task-gate-weights", "softmax", "--moe-task-gate-weights top-k"),  # equal shapes
    ("--encoder-layers", "3", "--encoder-layers 2"),  # a size option, as the MoE ones
]


@pytest.mark.parametrize("option,value,saved", CHANGES, ids=[change[0] for change in CHANGES])
def test_other_moe_options_are_refused_on_resume(option, value, saved, trained, data_dir, tmp_path):
    save_dir, extra = start_from("save-dir", trained.get("token", "target"), tmp_path)
    before = snapshot(save_dir)
    command = train_command(data_dir, save_dir, "token", "target", 13, (*extra, option, value))
    with pytest.raises(TaskMoeError) as refused:
        train_in_process(command)
    assert f"was trained with {saved} but this run has {option} {value};" in str(refused.value)
    assert f"resume or fine-tune it with {saved} (or train a new model in another --save-dir)" in str(refused.value)
    assert snapshot(save_dir) == before


def test_other_moe_options_are_refused_on_fine_tuning(trained, data_dir, tmp_path):
    save_dir, extra = start_from("finetune", trained.get("token", "target"), tmp_path)
    command = train_command(data_dir, save_dir, "token", "target", 2, (*extra, "--moe-top-k", "1", "--moe-expert-count", "8"))
    with pytest.raises(TaskMoeError, match="was trained with --moe-expert-count 4, --moe-top-k 2 but this run has "
                                           "--moe-expert-count 8, --moe-top-k 1;"):
        train_in_process(command)
    assert os.listdir(save_dir) == []


def test_an_extracted_checkpoint_fine_tunes_only_as_extracted(trained, data_dir, tmp_path):
    """The documented path (--moe-extracted-lang-pair, test_extract) loads; without the option the
    sub-network's few experts are one line, not fairseq's size mismatch."""
    extracted = str(tmp_path / "en-de.pt")
    run_main("taskmoe_fairseq.extract", "--checkpoint", trained.get("token", "target"), "--lang-pair", "en-de", "--output", extracted)
    command = train_command(data_dir, str(tmp_path / "ft"), "token", "target", 1, ("--finetune-from-model", extracted))
    command[command.index("--lang-pairs") + 1] = "en-de"
    with pytest.raises(TaskMoeError, match="was trained with --moe-extracted-lang-pair en-de but this run has "
                                           "no --moe-extracted-lang-pair;"):
        train_in_process(command)


def test_fairseq_train_prints_one_line(trained, data_dir, tmp_path):
    save_dir, extra = start_from("save-dir", trained.get("token", "target"), tmp_path)
    result = run_in_process(train_command(data_dir, save_dir, "token", "target", 13, (*extra, "--moe-expert-count", "8")), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"taskmoe-fairseq: error: {save_dir}/checkpoint_last.pt was trained with --moe-expert-count 4 but this run has "
        "--moe-expert-count 8; its parameters fit only the model it was trained as: resume or fine-tune it with "
        "--moe-expert-count 4 (or train a new model in another --save-dir)")


def test_an_expert_shard_is_checked_against_its_shared_file(tmp_path):
    """Expert-parallel resumes load ``<name>-rank-N.pt``: the config is in ``<name>-shared.pt``."""
    from model_helpers import build_model
    from taskmoe_fairseq.compat.model_identity import check_checkpoint_fits
    from taskmoe_fairseq.expert_parallel.sharded_checkpoint import save_sharded

    saved, _ = build_model(arch="taskmoe_transformer_tiny")
    stem = str(tmp_path / "checkpoint_last")
    save_sharded(saved.state_dict(), saved.args, stem, 2)
    other, _ = build_model(arch="taskmoe_transformer_tiny", moe_expert_count=8)
    with pytest.raises(TaskMoeError, match="rank-1.pt was trained with --moe-expert-count 4 but this run has --moe-expert-count 8;"):
        check_checkpoint_fits(other, stem + "-rank-1.pt")
    check_checkpoint_fits(build_model(arch="taskmoe_transformer_tiny", seed=5)[0], stem + "-rank-1.pt")  # the same model


def assert_one_line(result, message):
    """The command stopped with the plugin's one line (``taskmoe-fairseq: error: ...``), no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("taskmoe-fairseq: error: ") and message in last, result.stderr[-3000:]


def test_generation_refuses_another_language_order(trained, data_dir):
    """fairseq-generate builds the model from the checkpoint's config; the task's --langs must match it."""
    command = with_langs(generate_command(data_dir, trained.get("token", "target"), "en-de", beam=1), REORDERED)
    assert_one_line(run_in_process(command, check=False),
                    f"the model was trained with --langs {LANGS} but this run has --langs {REORDERED}")


@pytest.mark.slow
def test_data_parallel_ranks_refuse_together(ddp_checkpoint, data_dir, tmp_path):
    """Every rank reads the checkpoint's config and stops before any collective: no rank is left
    waiting (2 ranks started by torchrun, resuming the 2-rank run's checkpoint with other options)."""
    from cli_helpers import run
    from rank_runs import torchrun

    shutil.copyfile(ddp_checkpoint[0], tmp_path / "checkpoint_last.pt")
    args = train_command(data_dir, str(tmp_path), "token", "target", 14, ("--moe-expert-count", "8"))[1:]
    result = run(torchrun(2, args, "legacy_ddp"), check=False)
    # torchrun itself ends with its ChildFailedError traceback; the ranks (their lines prefixed [rankN]:) print one line each
    assert result.returncode == 1 and "]: Traceback" not in result.stderr, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank{rank}]: taskmoe-fairseq: error: {tmp_path}/checkpoint_last.pt was trained with --moe-expert-count 4" in result.stderr


def with_encoder_langtok(command, value):
    command = list(command)
    command[command.index("--encoder-langtok") + 1] = value
    return command


def test_another_language_tag_scheme_is_refused_on_resume_and_in_generation(trained, data_dir, tmp_path):
    """--encoder-langtok src on a model trained with tgt keeps every shape but feeds the encoder
    another tag: resume trained on and fairseq-generate decoded with it silently (a tester's finding)."""
    save_dir, extra = start_from("save-dir", trained.get("token", "target"), tmp_path)
    before = snapshot(str(tmp_path))
    with pytest.raises(TaskMoeError, match="was trained with --encoder-langtok tgt --decoder-langtok but this run has "
                                           "--encoder-langtok src --decoder-langtok; pass --encoder-langtok tgt"):
        train_in_process(with_encoder_langtok(train_command(data_dir, save_dir, "token", "target", 13, extra), "src"))
    assert snapshot(str(tmp_path)) == before
    fresh = str(tmp_path / "fresh")  # a checkpoint of today's code records its scheme for generation too
    train_in_process(train_command(data_dir, fresh, "token", "target", 1))
    generate = with_encoder_langtok(generate_command(data_dir, os.path.join(fresh, "checkpoint_last.pt"), "en-de", 1), "src")
    assert_one_line(run_in_process(generate, check=False), "--encoder-langtok tgt --decoder-langtok but this run has --encoder-langtok src")
