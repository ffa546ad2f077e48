"""Sparse upcycling (``--finetune-from-model DENSE.pt --moe-upcycle``): the MoE model starts as the
dense model (every expert a copy of its layer's FFN, the gates as initialised), so before its
first update it computes the dense model's function; a dense checkpoint without the option, or of
other sizes, is one line."""

import os

import pytest
import torch

from cli_helpers import run_in_process, train_command
from model_helpers import build_model, random_batch
from taskmoe_fairseq.safe_loading import safe_torch_load
from taskmoe_fairseq.errors import TaskMoeError

DENSE = {"encoder_moe_freq": 0, "decoder_moe_freq": 0}


def dense_model(**overrides):
    model, task = build_model(seed=1, **DENSE, **overrides)
    return model.eval(), task


@pytest.mark.parametrize("routing", [("token", "target"), ("pair", "pair"), ("token", "token")], ids="/".join)
def test_the_upcycled_model_starts_as_the_dense_model(routing):
    dense, task = dense_model()
    moe, _ = build_model(*routing, seed=2, task=task, moe_upcycle=True)
    fresh_gates = {key: value.clone() for key, value in moe.state_dict().items() if ".gate" in key or "moe_router" in key}
    assert fresh_gates
    moe.load_state_dict(dense.state_dict())  # fairseq's load_state_dict: upgrade_state_dict_named first
    moe.eval()
    state, dense_state = moe.state_dict(), dense.state_dict()
    for name, layer in moe.moe_layers():
        side, index = name.split(".")
        for expert in range(len(layer.experts)):
            for param, tensor in zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), layer.experts.ffn(expert)):
                assert torch.equal(tensor, dense_state[f"{side}.layers.{index}.{param}"])
    for key, value in fresh_gates.items():
        assert torch.equal(state[key], value), key  # the gates keep their own initialisation
    for key, value in dense_state.items():
        if key in state:
            assert torch.equal(state[key], value), key
    batch = random_batch(task.source_dictionary)
    with torch.no_grad():
        expected, _ = dense(**batch)
        got, _ = moe(**batch)
    # the k weights of every task (token) sum to 1: sum_k w_k FFN(x) = FFN(x), up to float32 rounding;
    # at the decoder's pad positions token routing gives a zero FFN output, which nothing reads
    real = batch["prev_output_tokens"].ne(task.target_dictionary.pad())
    assert real.sum() < real.numel()
    assert torch.allclose(got[real], expected[real], atol=1e-5), (got[real] - expected[real]).abs().max()


def test_a_moe_state_dict_is_left_as_it_is():
    """A run resumed from the upcycled model's own checkpoint loads its experts and gates."""
    trained, task = build_model(seed=3, moe_upcycle=True)
    fresh, _ = build_model(seed=4, task=task, moe_upcycle=True)
    fresh.load_state_dict(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_dense_checkpoint_without_the_option_is_one_line():
    dense, task = dense_model()
    moe, _ = build_model(seed=2, task=task)
    with pytest.raises(TaskMoeError, match=r"dense FFN where this model has experts \(encoder.1, decoder.1\): add --moe-upcycle"):
        moe.load_state_dict(dense.state_dict())


def test_a_dense_model_of_other_sizes_is_one_line():
    dense, task = dense_model(encoder_ffn_embed_dim=64)
    moe, _ = build_model(seed=2, task=task, moe_upcycle=True)
    with pytest.raises(TaskMoeError, match=r"--moe-upcycle: encoder.layers.0.fc1.weight is \[64, 64\] in the dense "
                                           r"checkpoint and \[128, 64\] here"):
        moe.load_state_dict(dense.state_dict())


def test_the_option_needs_a_dense_checkpoint_and_moe_layers():
    with pytest.raises(TaskMoeError, match="--moe-upcycle needs --finetune-from-model DENSE.pt"):
        build_model(moe_upcycle=True, finetune_from_model=None)
    with pytest.raises(TaskMoeError, match="this model has no MoE layers"):
        build_model(moe_upcycle=True, **DENSE)


def test_fairseq_train_upcycles_through_finetune_from_model(data_dir, tmp_path):
    """fairseq's own fine-tuning path: the dense run's checkpoint, then the MoE run from it (its
    updates counted from 0, fairseq's reset of optimizer and schedule); without --moe-upcycle,
    fairseq-train stops with the one line instead of fairseq's 'Cannot load model parameters'."""
    dense_dir, moe_dir = str(tmp_path / "dense"), str(tmp_path / "moe")
    dense = ("--encoder-moe-freq", "0", "--decoder-moe-freq", "0")
    run_in_process(train_command(data_dir, dense_dir, "token", "target", 3, dense))
    start = ("--finetune-from-model", os.path.join(dense_dir, "checkpoint_last.pt"))
    refused = run_in_process(train_command(data_dir, moe_dir, "token", "target", 2, start), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        "taskmoe-fairseq: error: the checkpoint has a dense FFN where this model has experts (encoder.1, decoder.1): "
        "add --moe-upcycle to start every expert from it (sparse upcycling), or load it with --encoder-moe-freq 0 "
        "--decoder-moe-freq 0")
    result = run_in_process(train_command(data_dir, moe_dir, "token", "target", 2, (*start, "--moe-upcycle")))
    assert f"loading pretrained model from {start[1]}: optimizer, lr scheduler, meters, dataloader will be reset" in result.stdout
    state = safe_torch_load(os.path.join(moe_dir, "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 2  # counted from 0, not from the dense run's 3
    model = state["model"]
    assert model["decoder.layers.1.moe.experts.fc1_weight"].size(0) == 4  # the layer's 4 experts, stacked
    assert "decoder.layers.1.fc1.weight" not in model and "decoder.layers.0.fc1.weight" in model
