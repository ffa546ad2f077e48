"""Issue #10's equivalence: with the same seed and data, E = 8, training with 2 and with 4
expert-parallel ranks gives the loss curve of one process holding every expert, over 20
updates, for token/target and target/target.

The same global batch in all three (``rank_runs``: the layout, and why dropout is 0 and the
token gate's second expert is taken whole: with ``sampling``, 2 ranks already route ~1% of
tokens differently from one process at update 1, while expert and data parallelism on the same
ranks agree exactly: test_expert_parallel_training). The ranks (torchrun) run legacy_ddp at both sizes (at 4 ranks, target/target under its other name, no_c10d): with pytorch_ddp at P = 2 and legacy_ddp at P = 4 the two curves parted
at update 16 (grad norm 0.398 vs 0.395; seen once, the cause not isolated: the likely one is that
an expert no rank used gets a zero gradient under legacy_ddp, which Adam still steps, and none
under pytorch_ddp with P = W, which Adam skips).
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

from cli_helpers import assert_same_metrics, run, train_metrics
from rank_runs import layout_args, log_of, one_process_curve, torchrun

UPDATES = 20
EXACT_UPDATES = 10  # held to logged precision against one process (see above for the rest)


# The 4-rank target/target run uses no_c10d, fairseq's other name for legacy_ddp's class: so both
# names get a 4-rank run held to one process (test_expert_parallel_training's 4-rank runs add
# pytorch_ddp).
FOUR_RANK_BACKEND = {("token", "target"): "legacy_ddp", ("target", "target"): "no_c10d"}


def expert_parallel_curve(data_dir, save_dir, routing, ranks):
    args = layout_args(data_dir, save_dir, routing, UPDATES, ranks, ("--no-save", "--disable-validation"))
    backend = FOUR_RANK_BACKEND[routing] if ranks == 4 else "legacy_ddp"
    result = run(torchrun(ranks, [*args, "--moe-expert-parallel-size", str(ranks)], backend))
    assert f"'ddp_backend': '{backend}'" in log_of(result)
    return train_metrics(result)


@pytest.mark.slow
@pytest.mark.parametrize("routing", [("token", "target"), ("target", "target")], ids="/".join)
def test_two_and_four_expert_parallel_ranks_follow_one_process(routing, data_dir, shared_root, tmp_path):
    curves = {ranks: expert_parallel_curve(data_dir, str(tmp_path / str(ranks)), routing, ranks) for ranks in (2, 4)}
    curves[1] = one_process_curve(data_dir, shared_root, routing, UPDATES)
    assert [row["num_updates"] for row in curves[1]] == list(range(1, UPDATES + 1))
    assert len({row["loss"] for row in curves[1]}) > UPDATES // 2  # the curve moves: the comparison is not vacuous
    assert_same_metrics(curves[4], curves[2])
    for ranks in (2, 4):
        assert_same_metrics(curves[ranks][:EXACT_UPDATES], curves[1][:EXACT_UPDATES])
        for update, (mine, reference) in enumerate(zip(curves[ranks], curves[1]), 1):
            for key in ("loss", "nll_loss"):
                assert abs(mine[key] - reference[key]) <= 5e-3, (ranks, update, key, mine[key], reference[key])
            assert abs(mine["gnorm"] / reference["gnorm"] - 1) <= 0.02, (ranks, update, mine["gnorm"], reference["gnorm"])
