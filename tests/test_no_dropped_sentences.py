"""Validation and generation see every sentence whatever --required-batch-size-multiple says
(fairseq's sampler trims the last batch to that multiple: 13 sentences, batch 16 -> 8)."""

import pytest
import torch
from fairseq import options, tasks

from cli_helpers import TASK_ARGS, TEST_LINES, generate_command, parse_generation, run_in_process

import taskmoe_fairseq  # noqa: F401  (registers the task)


@pytest.fixture(scope="module")
def task(data_dir):
    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(
        parser, [data_dir, *TASK_ARGS, "--source-lang", "en", "--target-lang", "de", "--path", "unused.pt"]
    )
    return tasks.setup_task(args)


def sentences(task, dataset, **kwargs):
    iterator = task.get_batch_iterator(dataset, max_positions=(1024, 1024), **kwargs).next_epoch_itr(shuffle=False)
    return sorted(i for batch in iterator for i in batch["id"].tolist())


@pytest.mark.parametrize("max_sentences", [16, 5, 3])
def test_inference_datasets_keep_every_sentence_with_the_default_multiple(task, max_sentences):
    # the path of fairseq-interactive and the hub interface
    sources = [torch.tensor([5 + i % 7] * (3 + i % 5) + [2]) for i in range(13)]
    dataset = task.build_dataset_for_inference(sources, [len(s) for s in sources])
    assert sentences(task, dataset, max_sentences=max_sentences, required_batch_size_multiple=8) == list(range(13))
    # (positional arguments, as some callers pass them)
    iterator = task.get_batch_iterator(dataset, None, max_sentences, (1024, 1024), False, 8).next_epoch_itr(shuffle=False)
    assert sum(batch["id"].numel() for batch in iterator) == 13


def test_loaded_splits_keep_every_sentence(task):
    # the path of fairseq-generate and of validation
    task.load_dataset("test")
    got = sentences(task, task.dataset("test"), max_sentences=7, required_batch_size_multiple=8)
    assert len(got) == TEST_LINES


def test_fairseq_generate_translates_every_sentence_with_its_default_multiple(trained, data_dir):
    command = generate_command(data_dir, trained.get("token", "target"), "en-de", beam=1)
    index = command.index("--required-batch-size-multiple")
    del command[index: index + 2]
    command[command.index("--batch-size") + 1] = "7"  # 24 sentences: the old sampler kept 16
    assert len(parse_generation(run_in_process(command).stdout)) == TEST_LINES
