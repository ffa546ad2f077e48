"""Expert-parallel training through the real fairseq-train on CPU ranks (gloo).

* 2 ranks, P = 2, ``no_c10d``, against the session's 2-rank data-parallel run (``ddp_checkpoint``:
  token/target, E = 4, ``legacy_ddp``, the same class under its other name; 6 updates then
  resumed to 12, same data, seed and options): same losses, sharded checkpoints that resume,
  consolidate, generate and extract; ``pytorch_ddp`` for 3 updates.
* 4 ranks, P = 2 (two data-parallel replicas of two expert shards), ``pytorch_ddp``: train,
  sharded resume, and the loss curve of one process holding every expert (no_c10d's 4-rank run
  is in test_expert_parallel_equivalence).

Every multi-rank run is a torchrun launch of real processes (``rank_runs.torchrun``).
"""

import os
import re

import pytest
import torch

from cli_helpers import (TEST_LINES, assert_same_metrics, generate_command, parse_generation, python_module, run, run_in_process,
                         run_main, train_command, train_metrics)
from conftest import DDP_EXTRA
from rank_runs import assert_ranks, layout_args, log_of, one_process_curve, shared_runs, torchrun
from taskmoe_fairseq.safe_loading import safe_torch_load
from taskmoe_fairseq.expert_parallel.sharded_checkpoint import read_meta

pytestmark = pytest.mark.slow  # every test here uses torchrun runs (the ep_run fixture or its own)



def ep_command(data_dir, save_dir, max_update):
    command = train_command(data_dir, save_dir, "token", "target", max_update, DDP_EXTRA)[1:]
    return torchrun(2, [*command, "--moe-expert-parallel-size", "2"], "no_c10d")


@pytest.fixture(scope="module")
def ep_run(data_dir, shared_root):
    """P = 2 on 2 ranks: 6 updates, then resumed to 12 from the sharded checkpoint (built once per
    test run: the xdist workers share it)."""
    return shared_runs(shared_root, "ep-2-ranks", lambda folder: [ep_command(data_dir, folder, n) for n in (6, 12)])


@pytest.fixture(scope="module")
def consolidated(ep_run, shared_root):
    def commands(folder):
        return [python_module("taskmoe_fairseq.consolidate", "--checkpoint-dir", ep_run[0], "--output", os.path.join(folder, "full.pt"))]

    folder, (result,) = shared_runs(shared_root, "ep-2-ranks-consolidated", commands)
    return os.path.join(folder, "full.pt"), result


def valid_loss(checkpoint, data_dir):
    """Label-smoothed loss per target token over the valid split, float64 sums (in-process)."""
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data_dir})
    model = models[0].eval()
    task.load_dataset("valid")
    criterion = task.build_criterion(cfg.criterion)
    batches = task.get_batch_iterator(task.dataset("valid"), max_tokens=1500).next_epoch_itr(shuffle=False)
    total = size = 0.0
    with torch.no_grad():
        for sample in batches:
            loss, sample_size, _ = criterion(model, sample)
            total, size = total + loss.item(), size + sample_size
    return total / size


def test_expert_parallel_training_matches_data_parallel(ep_run, ddp_checkpoint, consolidated, data_dir):
    """Every update's logged loss, nll_loss, gate loss, expert balance and drop shares, lr and
    grad norm are those of data-parallel training (fairseq logs 3 decimals; seen: one balance
    share at update 9 rounded 1.148 vs 1.149), and the 12-update models' valid loss
    (in-process, full precision) agrees within 1e-5 (seen: 4e-6)."""
    ddp_full, ddp_logs = ddp_checkpoint
    _, ep_logs = ep_run
    ddp_metrics = [row for result in ddp_logs for row in train_metrics(result)]
    ep_metrics = [row for result in ep_logs for row in train_metrics(result)]
    assert [row["num_updates"] for row in ep_metrics] == list(range(1, 13))
    assert_same_metrics(ep_metrics, ddp_metrics)
    assert abs(valid_loss(consolidated[0], data_dir) - valid_loss(ddp_full, data_dir)) < 1e-5
    # the experts really were split: each rank holds half of them (fairseq counts them apart)
    log = log_of(ep_logs[0])
    assert_ranks(log, 2, "no_c10d", "env://")
    assert "expert parallelism: 8 expert parameters are left out of DDP" in log
    assert re.search(r"num\. expert model params: \d+", log)


def test_sharded_checkpoint_files_and_resume(ep_run):
    save_dir, (first, resumed) = ep_run
    names = sorted(os.listdir(save_dir))
    for stem in ("checkpoint_last", "checkpoint_best"):
        assert {f"{stem}-shared.pt", f"{stem}-rank-0.pt", f"{stem}-rank-1.pt"} <= set(names), names
    assert "checkpoint_last.pt" not in names
    assert re.search(r"Loaded checkpoint \S*checkpoint_last-rank-0\.pt \(epoch \d+ @ 6 updates\)", log_of(resumed))
    shared = safe_torch_load(os.path.join(save_dir, "checkpoint_last-shared.pt"))
    shards = [safe_torch_load(os.path.join(save_dir, f"checkpoint_last-rank-{shard}.pt")) for shard in (0, 1)]
    assert not any(".moe.experts." in key for key in shared["model"])
    for shard in shards:
        # E = 4 over P = 2: local experts 0 and 1 of each MoE layer (encoder.1, decoder.1), 4 stacked tensors each
        assert len(shard["model"]) == 2 * 4 and all(".moe.experts." in key for key in shard["model"])
        assert all(tensor.size(0) == 2 for tensor in shard["model"].values())
        assert set(shard["optimizer_state"]) and not set(shard["optimizer_state"]) & set(shared["last_optimizer_state"]["state"])
    assert not torch.equal(*(s["model"]["decoder.layers.1.moe.experts.fc1_weight"] for s in shards))
    metas = [read_meta(os.path.join(save_dir, f"checkpoint_last-{part}.pt")) for part in ("shared", "rank-0", "rank-1")]
    assert {meta["run"] for meta in metas} == {metas[0]["run"]} and metas[0]["num_updates"] == 12
    assert read_meta(os.path.join(save_dir, "checkpoint_best-shared.pt"))["run"] == metas[0]["run"]


def test_consolidated_checkpoint_generates(consolidated, data_dir):
    checkpoint, result = consolidated
    assert "2 shards of E = 4 experts (12 updates)" in result.stderr
    state = safe_torch_load(checkpoint)
    assert state["cfg"]["model"].moe_expert_parallel_size == 1
    assert state["model"]["decoder.layers.1.moe.experts.fc1_weight"].size(0) == 4  # every expert, stacked
    hypotheses = parse_generation(run_in_process(generate_command(data_dir, checkpoint, "en-de", beam=2)).stdout)
    assert len(hypotheses) == TEST_LINES


def test_pytorch_ddp_through_torchrun(ddp_checkpoint, data_dir, tmp_path):
    """fairseq's default backend, launched by torchrun: the expert parameters are left out of
    torch's DistributedDataParallel (neither broadcast nor all-reduced), and the first 3 updates
    match the data-parallel run (every expert of this model gets tokens in each of them, so
    legacy_ddp's zero gradients and pytorch_ddp's missing ones do not differ)."""
    command = train_command(data_dir, str(tmp_path / "ckpt"), "token", "target", 3, DDP_EXTRA)[1:]
    result = run(torchrun(2, [*command, "--moe-expert-parallel-size", "2", "--no-save"]))
    log = log_of(result)
    assert_ranks(log, 2, "pytorch_ddp", "env://")
    assert "expert parallelism: 8 expert parameters are left out of DDP" in log
    assert_same_metrics(train_metrics(result), train_metrics(ddp_checkpoint[1][0])[:3])


def extract(*args):
    return run_in_process(python_module("taskmoe_fairseq.extract", *args))


def test_extraction_from_the_shards_equals_extraction_from_the_consolidated_file(ep_run, consolidated, data_dir, tmp_path):
    """token/target: the encoder's token-routed layer keeps every expert, so every shard is read;
    the result is the extraction of the consolidated checkpoint, tensor for tensor, and it
    translates through fairseq-generate."""
    shared = os.path.join(ep_run[0], "checkpoint_last-shared.pt")
    from_shards, from_full = str(tmp_path / "shards" / "de-en.pt"), str(tmp_path / "full" / "de-en.pt")
    result = extract("--checkpoint", shared, "--lang-pair", "de-en", "--output", from_shards)
    extract("--checkpoint", consolidated[0], "--lang-pair", "de-en", "--output", from_full)
    assert "read expert shards [0, 1]" in result.stderr
    a, b = safe_torch_load(from_shards)["model"], safe_torch_load(from_full)["model"]
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
    hypotheses = parse_generation(run_in_process(generate_command(data_dir, from_shards, "de-en", beam=2)).stdout)
    assert len(hypotheses) == TEST_LINES


def test_pruning_from_the_shards_equals_pruning_the_consolidated_file(ep_run, consolidated, data_dir, tmp_path):
    """extract --prune-token-experts runs the model on the pair's data, so it needs every expert:
    from the shards (all read, the model built whole, not on the meta device) it gives the
    consolidated file's pruned sub-network, tensor for tensor."""
    shared = os.path.join(ep_run[0], "checkpoint_last-shared.pt")
    from_shards, from_full = str(tmp_path / "shards" / "de-en.pt"), str(tmp_path / "full" / "de-en.pt")
    prune = ("--prune-token-experts", "2", "--data-dir", data_dir)
    result = extract("--checkpoint", shared, "--lang-pair", "de-en", "--output", from_shards, *prune)
    extract("--checkpoint", consolidated[0], "--lang-pair", "de-en", "--output", from_full, *prune)
    assert "read expert shards [0, 1]" in result.stderr
    a, b = safe_torch_load(from_shards)["model"], safe_torch_load(from_full)["model"]
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
    assert a["encoder.layers.1.moe.gate.wg.weight"].shape[0] == 2


def test_single_process_run_on_an_expert_parallel_save_dir_is_refused(ep_run, data_dir):
    """Without --moe-expert-parallel-size, fairseq would look for checkpoint_last.pt, find none and
    silently start afresh beside the shards: one line instead."""
    command = train_command(data_dir, ep_run[0], "token", "target", 14)
    result = run_in_process(command, check=False)
    assert result.returncode != 0
    assert ("holds an expert-parallel checkpoint (checkpoint_last-shared.pt, P = 2) and no checkpoint_last.pt: "
            "resume with --moe-expert-parallel-size 2") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["pytorch_ddp"])
def test_four_ranks_with_two_expert_shards_train_and_resume(backend, data_dir, shared_root, tmp_path):
    """P = 2 on 4 ranks: ranks {0, 1} and {2, 3} are two expert-parallel groups, each holding the
    E = 8 experts as two shards of 4; ranks {0, 2} and {1, 3} are each shard's replicas (its
    gradients summed over them); the shared parameters go through the backend over all 4 ranks.
    (no_c10d, one class with
    legacy_ddp, ran here too until its 4-rank run moved into test_expert_parallel_equivalence,
    P = 4 target/target: the same class over 4 ranks, held to one process for 20 updates, at no
    extra cost to the suite.) 3 updates, then resumed
    from the sharded checkpoint to 5 (every rank reads the shared file and its shard: ranks 2 and 3
    read the files ranks 0 and 1 wrote). The 4 ranks take the global batches of one process with
    --update-freq 4 (rank_runs), so every update's logged metrics, resume included, are those of one
    process holding all 8 experts, to fairseq's 3 logged decimals: a wrong expert gradient, a
    replica that drifted or a shard resumed on the wrong rank would show in the loss."""
    save_dir = str(tmp_path / "ckpt")
    routing = ("token", "target")

    def start(max_update):
        args = [*layout_args(data_dir, save_dir, routing, max_update, 4), "--moe-expert-parallel-size", "2"]
        return torchrun(4, args, backend)

    results = [run(start(max_update)) for max_update in (3, 5)]
    for result in results:
        assert_ranks(log_of(result), 4, backend, "env://")
        # E = 8 over P = 2: 4 local experts in each of the 2 MoE layers, stacked in 4 tensors
        assert "expert parallelism: 8 expert parameters are left out of DDP" in log_of(result)
    assert re.search(r"Loaded checkpoint \S*checkpoint_last-rank-0\.pt \(epoch 1 @ 3 updates\)", log_of(results[1]))
    curve = [row for result in results for row in train_metrics(result)]
    assert [row["num_updates"] for row in curve] == [1, 2, 3, 4, 5]
    assert_same_metrics(curve, one_process_curve(data_dir, shared_root, routing, 20)[:5])

    names = set(os.listdir(save_dir))
    assert {"checkpoint_last-shared.pt", "checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt"} <= names, names
    assert not {"checkpoint_last.pt", "checkpoint_last-rank-2.pt", "checkpoint_last-rank-3.pt"} & names, names  # replicas do not save
    paths = [os.path.join(save_dir, f"checkpoint_last-rank-{shard}.pt") for shard in (0, 1)]
    metas = [read_meta(path) for path in paths]
    assert [(meta["shard"], meta["size"], meta["num_updates"]) for meta in metas] == [(0, 2, 5), (1, 2, 5)]
    assert metas[0]["run"] == metas[1]["run"] == read_meta(os.path.join(save_dir, "checkpoint_last-shared.pt"))["run"]
    shards = [safe_torch_load(path)["model"] for path in paths]
    assert all(len(shard) == 2 * 4 and all(t.size(0) == 4 for t in shard.values()) for shard in shards)  # 2 layers' stacks of 4
    assert not torch.equal(*(shard["decoder.layers.1.moe.experts.fc1_weight"] for shard in shards))


def test_a_checkpoint_name_that_expert_parallel_training_split_names_its_shared_file(ep_run, tmp_path):
    """``checkpoint_last.pt`` of an expert-parallel run does not exist (its parts do): every command that
    takes a checkpoint says which file extract reads and how to consolidate, instead of only 'no such file'."""
    missing = os.path.join(ep_run[0], "checkpoint_last.pt")
    for module, args in (("taskmoe_fairseq.extract", ["--checkpoint", missing, "--lang-pair", "en-de", "--output",
                                                      str(tmp_path / "x.pt")]),
                         ("taskmoe_fairseq.translate", ["--model", missing, "--lang-pair", "en-de"]),
                         ("taskmoe_fairseq.serve", ["--checkpoint", missing])):
        result = run_main(module, *args, check=False, stdin="")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (module, result.stderr)
        assert f"saved it as {os.path.join(ep_run[0], 'checkpoint_last')}-shared.pt" in lines[0], lines[0]
        assert "python -m taskmoe_fairseq.consolidate" in lines[0]
    assert not os.path.exists(tmp_path / "x.pt")
