"""python -m taskmoe_fairseq.extract through the real CLIs: the extracted checkpoints load in
fairseq-generate / fairseq-interactive / --finetune-from-model and translate exactly as the full
model (one smoke test per tool; every routing and dtype is covered in-process by
test_extraction.py). extract and fairseq-interactive each start once as a real process; the
other command-line runs call the command's entry point in this process (cli_helpers.run_in_process)."""

import hashlib
import json
import os

import pytest
import torch

from cli_helpers import (
    LANG_PAIRS,
    TASK_ARGS,
    TEST_LINES,
    generate_command,
    parse_generation,
    python_module,
    run,
    run_in_process,
    run_main,
    run_in_process,
)
from taskmoe_fairseq.safe_loading import safe_torch_load

SCORE_TOLERANCE = 1e-4
# fairseq-generate prints positional scores rounded to 4 decimals: two values within 1e-4
# of each other may print up to 2e-4 apart. Sentence scores are printed in full.
PRINTED_POSITIONAL_TOLERANCE = 2e-4 + 1e-9


def extract(checkpoint, *args, real_process=False):
    if real_process:
        return run(python_module("taskmoe_fairseq.extract", "--checkpoint", checkpoint, *args))
    return run_main("taskmoe_fairseq.extract", "--checkpoint", checkpoint, *args)


def assert_same_translations(data_dir, full, extracted_dirs, pairs=("ru-en",), beams=(4,)):
    """Identical hypotheses, scores within 1e-4 (greedy and every routing: test_extraction.py)."""
    jobs = [
        (pair, beam, checkpoint)
        for pair in pairs
        for beam in beams
        for checkpoint in [full] + [os.path.join(folder, f"{pair}.pt") for folder in extracted_dirs]
    ]
    outputs = [run_in_process(generate_command(data_dir, checkpoint, pair, beam)) for pair, beam, checkpoint in jobs]
    by_job = {(pair, beam, checkpoint): parse_generation(out.stdout) for (pair, beam, checkpoint), out in zip(jobs, outputs)}
    for pair in pairs:
        for beam in beams:
            reference = by_job[(pair, beam, full)]
            assert len(reference) == TEST_LINES
            for folder in extracted_dirs:
                got = by_job[(pair, beam, os.path.join(folder, f"{pair}.pt"))]
                assert sorted(got) == sorted(reference)
                for sentence, (text, score, positional) in reference.items():
                    other_text, other_score, other_positional = got[sentence]
                    where = f"{pair} beam {beam} sentence {sentence} ({os.path.basename(folder)})"
                    assert other_text == text, where
                    assert abs(other_score - score) <= SCORE_TOLERANCE, where
                    assert len(other_positional) == len(positional), where
                    assert max(abs(a - b) for a, b in zip(positional, other_positional)) <= PRINTED_POSITIONAL_TOLERANCE, where


@pytest.mark.slow
def test_extracted_checkpoints_translate_exactly_like_the_full_model(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    before = hashlib.sha256(open(full, "rb").read()).hexdigest()
    kept, merged = str(tmp_path / "kept"), str(tmp_path / "merged")
    extract(full, "--all-lang-pairs", "--output-dir", kept, real_process=True)
    extract(full, "--lang-pair", "ru-en", "--output-dir", merged, "--merge-experts")
    assert hashlib.sha256(open(full, "rb").read()).hexdigest() == before  # input untouched
    data_files = ["dict.en.txt", "dict.de.txt", "dict.fr.txt", "dict.ru.txt", "spm.model"]  # beside, for translate alone
    assert sorted(os.listdir(kept)) == sorted([f"{p}.pt" for p in LANG_PAIRS] + [f"{p}.report.json" for p in LANG_PAIRS] + data_files)
    assert_same_translations(data_dir, full, [kept, merged])


@pytest.mark.slow
def test_extracted_from_two_process_training(ddp_checkpoint, data_dir, tmp_path):
    full, _ = ddp_checkpoint
    kept = str(tmp_path / "kept")
    extract(full, "--lang-pair", "ru-en", "--output-dir", kept)
    assert_same_translations(data_dir, full, [kept])


def test_extracted_token_target_keeps_encoder_experts_and_k_decoder_experts(trained, tmp_path):
    full = trained.get("token", "target")
    extract(full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"))
    state = safe_torch_load(str(tmp_path / "en-de.pt"))
    args = state["cfg"]["model"]
    assert args.moe_extracted_lang_pair == "en-de"
    # the token-routed encoder layer keeps its stack; the target-routed decoder layer k expert modules
    assert state["model"]["encoder.layers.1.moe.experts.fc1_weight"].size(0) == args.moe_expert_count == 4
    decoder_experts = {key.split(".")[5] for key in state["model"] if key.startswith("decoder.layers.1.moe.experts.")}
    assert decoder_experts == {str(j) for j in range(args.moe_top_k)} and args.moe_top_k == 2
    assert not any("gate" in key for key in state["model"] if key.startswith(("decoder.", "encoder.moe_router")))
    assert "last_optimizer_state" not in state
    report = json.load(open(tmp_path / "en-de.report.json"))
    assert [row["layer"] for row in report["layers"]] == ["decoder.1"]
    assert report["params_after"] < report["params_before"]


@pytest.mark.slow
def test_interactive_on_extracted_checkpoint_matches_full_model(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    extract(full, "--lang-pair", "fr-en", "--output", str(tmp_path / "fr-en.pt"), "--merge-experts")
    source_lines = open(os.path.join(data_dir, "spm", "test.en-fr.fr")).read().splitlines()[:6]

    def interactive(checkpoint, run=run):
        command = ["fairseq-interactive", data_dir, *TASK_ARGS, "--source-lang", "fr", "--target-lang", "en",
                   "--path", checkpoint, "--beam", "4", "--max-len-b", "20", "--cpu"]
        return [line for line in run(command, stdin="\n".join(source_lines) + "\n").stdout.splitlines() if line.startswith("H-")]

    full_hypotheses = interactive(full, run=run_in_process)  # (fairseq-interactive's real process is the next one)
    assert len(full_hypotheses) == 6
    extracted = interactive(str(tmp_path / "fr-en.pt"))
    assert [line.split("\t")[2] for line in extracted] == [line.split("\t")[2] for line in full_hypotheses]


def test_extracted_checkpoint_fine_tunes_with_finetune_from_model(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    extract(full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"))
    from cli_helpers import train_command

    command = train_command(data_dir, str(tmp_path / "ft"), "token", "target", 2,
                            extra=("--finetune-from-model", str(tmp_path / "en-de.pt"),
                                   "--moe-extracted-lang-pair", "en-de"))
    command[command.index("--lang-pairs") + 1] = "en-de"
    command[command.index("--lr") + 1] = "0"  # two real updates that change nothing: the weights stay the loaded ones
    run_in_process(command)
    loaded = safe_torch_load(str(tmp_path / "en-de.pt"))["model"]
    tuned = safe_torch_load(str(tmp_path / "ft" / "checkpoint_last.pt"))
    assert tuned["optimizer_history"][-1]["num_updates"] == 2
    assert tuned["model"].keys() == loaded.keys()
    for key, tensor in loaded.items():
        assert torch.equal(tuned["model"][key].float(), tensor.float()), key


def test_report_for_32_experts_shows_decoder_layers_shrinking_by_e_over_k(trained):
    full = trained.get("token", "target", 1, ("--moe-expert-count", "32"))
    folder = os.path.dirname(full)
    before = sorted(os.listdir(folder))
    result = extract(full, "--lang-pair", "de-en", "--report-only")
    assert "32 -> 2" in result.stdout
    assert sorted(os.listdir(folder)) == before  # --report-only wrote nothing beside the checkpoint
    state = safe_torch_load(full)
    expert_params = sum(t.numel() for k, t in state["model"].items() if k.startswith("decoder.layers.1.moe.experts."))
    from taskmoe_fairseq.extract import load_model

    _, rows = load_model(state, state["cfg"]["model"]).extract("de-en")
    (row,) = rows
    assert row["experts_before"] == 32 and len(row["experts_kept"]) == 2
    assert row["params_before"] >= expert_params
    assert row["params_before"] / row["params_after"] >= 32 / 2
