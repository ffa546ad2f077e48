"""Expert parallelism (``--moe-expert-parallel-size``): two gloo ranks each holding half the
experts give the outputs and gradients of one process holding all of them."""

import torch.multiprocessing as mp

from expert_parallel_workers import exactness_worker


def test_two_ranks_match_one_process_forward_and_backward(tmp_path):
    """Token routing (GShard gate with capacity) and a per-sentence decision (task routing's
    path), E = 4 on P = 2 ranks with different batch shapes: outputs, input gradients, every
    expert's parameters and gradient (summed over both ranks' tokens by the all-to-all's
    backward) and the token gate's gradient within 1e-5 of the single-process layer."""
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(exactness_worker, args=(2, str(tmp_path / "rendezvous"), ("token", "sentence"), failures), nprocs=2)
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert len([m for m in messages if " checked " in m]) == 4, messages
    assert [m for m in messages if " checked " not in m] == []
