"""A batch that mixes language pairs, built through fairseq's real sampled multilingual
dataset and collater, carries each sentence's own language ids."""

from fairseq import options, tasks

from cli_helpers import LANGS, TASK_ARGS

import taskmoe_fairseq  # noqa: F401  (registers the task)


def test_mixed_pair_batches_carry_the_right_language_ids_on_every_row(data_dir):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_dir, *TASK_ARGS, "--arch", "taskmoe_transformer_tiny", "--max-tokens", "3000",
                 "--sampling-method", "temperature", "--sampling-temperature", "5", "--seed", "2"]
    )
    args.max_source_positions = args.max_target_positions = 1024  # (set by the model's arch in fairseq-train)
    task = tasks.setup_task(args)
    task.load_dataset("train", epoch=1)
    dataset = task.dataset("train")  # fairseq's SampledMultiEpochDataset over the pairs
    langs = LANGS.split(",")
    iterator = task.get_batch_iterator(
        dataset, max_tokens=3000, max_positions=(1024, 1024), required_batch_size_multiple=1, seed=2
    ).next_epoch_itr(shuffle=True)
    # which pairs each source sentence (with its tag) belongs to, read from each pair's own dataset
    pairs_of = {}
    for key, pair_dataset in zip(dataset.keys, dataset.datasets):
        src, tgt = key.split(":")[-1].split("-")
        for index in range(len(pair_dataset)):
            source = tuple(pair_dataset[index]["source"].tolist())
            pairs_of.setdefault(source, set()).add((langs.index(src), langs.index(tgt)))
    pad = task.source_dictionary.pad()
    mixed_batches = 0
    for batch_index, batch in zip(range(6), iterator):
        net_input = batch["net_input"]
        carried = list(zip(net_input["src_lang_id"].tolist(), net_input["tgt_lang_id"].tolist()))
        for row, ids in enumerate(carried):
            source = tuple(net_input["src_tokens"][row][net_input["src_tokens"][row].ne(pad)].tolist())
            assert ids in pairs_of[source], (batch_index, row)
        truth = carried
        # and the tags fairseq put in the text agree: <tgt> first on the (left-padded) source
        for row, (_, tgt) in enumerate(truth):
            first = net_input["src_tokens"][row][net_input["src_tokens"][row].ne(pad)][0]
            assert task.source_dictionary[first] == f"__{langs[tgt]}__"
        mixed_batches += len(set(truth)) > 1
    assert mixed_batches >= 3  # the check means something only on batches that mix pairs
