"""Issue #10's equivalence: with the same seed and data, E = 8, training with 2 and with 4
expert-parallel ranks gives the loss curve of one process holding every expert, over 20
updates, for token/target and target/target.

The same global batch in all three: one process with ``--update-freq 4`` takes batches
0-3 for update 1, 4-7 for update 2, ...; 2 ranks with ``--update-freq 2`` and 4 ranks with
``--update-freq 1`` take the same batches (fairseq shards the batch list round-robin over ranks).
Nothing random may differ: fairseq seeds each micro-batch by its index, which differs between
these layouts, so dropout is 0 and the token gate's second expert is taken whole (``all``)
instead of sampled (with ``sampling``, 2 ranks already route ~1% of tokens differently from one
process at update 1, while expert and data parallelism on the same ranks agree exactly:
test_expert_parallel_training).
Tolerance: fairseq logs 3 decimals; a logged value may flip at a rounding boundary (1.001e-3).
2 and 4 expert-parallel ranks give the same curve to that precision for all 20 updates. Against
one process, the gradients are the same sums taken in another order (one process accumulates the
4 micro-batches in turn; the ranks all-reduce partial sums), and Adam carries those float32
differences on: every logged value agrees to logged precision for the first 10 updates; after
that, seen on this fixture, loss and nll_loss within 2e-3, the grad norm within 0.8%, and the
token gate's capacity decisions flip for a few tokens (drop share within 0.008). So updates 11-20
are held to loss and nll_loss within 5e-3 and the grad norm within 2%.
"""

import pytest

from cli_helpers import assert_same_metrics, python_module, run, train_command, train_metrics

UPDATES = 20
EXACT_UPDATES = 10  # held to logged precision against one process (see above for the rest)
# 500 tokens per batch: about 100 batches per epoch of the fixture, so 20 updates x 4 batches stay in epoch 1
OPTIONS = ("--moe-expert-count", "8", "--dropout", "0", "--moe-second-expert-policy", "all", "--max-tokens", "500", "--log-interval", "1", "--no-save")


def command(data_dir, save_dir, routing, ranks):
    train = train_command(data_dir, save_dir, *routing, UPDATES, OPTIONS + ("--update-freq", str(4 // ranks)))
    if ranks == 1:
        return train
    return python_module("taskmoe_fairseq.cpu_data_parallel", "--nprocs", str(ranks), "--", *train[1:],
                         "--moe-expert-parallel-size", str(ranks))


@pytest.mark.parametrize("routing", [("token", "target"), ("target", "target")], ids="/".join)
def test_two_and_four_expert_parallel_ranks_follow_one_process(routing, data_dir, tmp_path):
    curves = {ranks: train_metrics(run(command(data_dir, str(tmp_path / str(ranks)), routing, ranks)))
              for ranks in (1, 2, 4)}
    assert [row["num_updates"] for row in curves[1]] == list(range(1, UPDATES + 1))
    assert len({row["loss"] for row in curves[1]}) > UPDATES // 2  # the curve moves: the comparison is not vacuous
    assert_same_metrics(curves[4], curves[2])
    for ranks in (2, 4):
        assert_same_metrics(curves[ranks][:EXACT_UPDATES], curves[1][:EXACT_UPDATES])
        for update, (mine, reference) in enumerate(zip(curves[ranks], curves[1]), 1):
            for key in ("loss", "nll_loss"):
                assert abs(mine[key] - reference[key]) <= 5e-3, (ranks, update, key, mine[key], reference[key])
            assert abs(mine["gnorm"] / reference["gnorm"] - 1) <= 0.02, (ranks, update, mine["gnorm"], reference["gnorm"])
