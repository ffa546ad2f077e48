"""``fairseq-generate --sampling --seed N`` samples the same tokens from a full and an extracted
model (issue 28): fairseq seeds torch before it builds the model, and the random initialisation
that the checkpoint then overwrites drew a different number of values for the two models, so
their sampling started from different points of the stream. The task builds a model loaded from
a checkpoint on a fork of the generator (``MultilingualTranslationTaskMoeTask.build_model``)."""

import pytest

from cli_helpers import generate_command, parse_generation, run_in_process, run_main


def sample(data_dir, checkpoint, seed):
    command = generate_command(data_dir, checkpoint, "en-de", beam=1) + ["--sampling", "--sampling-topk", "20", "--seed", str(seed)]
    return parse_generation(run_in_process(command).stdout)


def test_sampling_from_full_and_extracted_models_draws_the_same_tokens(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    extracted = str(tmp_path / "en-de.pt")
    run_main("taskmoe_fairseq.extract", "--checkpoint", full, "--lang-pair", "en-de", "--output", extracted)
    want = sample(data_dir, full, seed=7)
    got = sample(data_dir, extracted, seed=7)
    assert got.keys() == want.keys() and len(want) == 24
    for index, (hypothesis, score, positional) in want.items():
        assert got[index][0] == hypothesis, index
        assert got[index][1] == pytest.approx(score, abs=1e-4)
        assert got[index][2] == pytest.approx(positional, abs=1e-4)
    # the comparison would see a different stream: another seed samples other tokens
    other = sample(data_dir, full, seed=8)
    assert sum(other[index][0] != want[index][0] for index in want) >= 12
