"""python -m taskmoe_fairseq.extract: the extracted sub-network translates exactly as the
full model, proven through the real fairseq-generate (beam 4 and greedy), for every pair."""

import hashlib
import json
import os

import pytest

from cli_helpers import (
    LANG_PAIRS,
    TASK_ARGS,
    TEST_LINES,
    generate_command,
    parse_generation,
    python_module,
    run,
    run_many,
)
from taskmoe_fairseq.compat import safe_torch_load

SCORE_TOLERANCE = 1e-4
# fairseq-generate prints positional scores rounded to 4 decimals: two values within 1e-4
# of each other may print up to 2e-4 apart. Sentence scores are printed in full.
PRINTED_POSITIONAL_TOLERANCE = 2e-4 + 1e-9


def extract(checkpoint, *args):
    return run(python_module("taskmoe_fairseq.extract", "--checkpoint", checkpoint, *args))


def assert_same_translations(data_dir, full, extracted_dirs):
    """Every pair, beam 4 and greedy: identical hypotheses, scores within 1e-4."""
    jobs = [
        (pair, beam, checkpoint)
        for pair in LANG_PAIRS
        for beam in (4, 1)
        for checkpoint in [full] + [os.path.join(folder, f"{pair}.pt") for folder in extracted_dirs]
    ]
    outputs = run_many([generate_command(data_dir, checkpoint, pair, beam) for pair, beam, checkpoint in jobs])
    by_job = {(pair, beam, checkpoint): parse_generation(out.stdout) for (pair, beam, checkpoint), out in zip(jobs, outputs)}
    for pair in LANG_PAIRS:
        for beam in (4, 1):
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


@pytest.mark.parametrize("routing", [("token", "target"), ("target", "target"), ("pair", "pair")])
def test_extracted_checkpoints_translate_exactly_like_the_full_model(routing, trained, data_dir, tmp_path):
    full = trained.get(*routing)
    before = hashlib.sha256(open(full, "rb").read()).hexdigest()
    kept, merged = str(tmp_path / "kept"), str(tmp_path / "merged")
    extract(full, "--all-lang-pairs", "--output-dir", kept)
    extract(full, "--all-lang-pairs", "--output-dir", merged, "--merge-experts")
    assert hashlib.sha256(open(full, "rb").read()).hexdigest() == before  # input untouched
    assert_same_translations(data_dir, full, [kept, merged])


def test_extracted_from_two_process_training(ddp_checkpoint, data_dir, tmp_path):
    full, _ = ddp_checkpoint
    kept, merged = str(tmp_path / "kept"), str(tmp_path / "merged")
    extract(full, "--all-lang-pairs", "--output-dir", kept)
    extract(full, "--all-lang-pairs", "--output-dir", merged, "--merge-experts")
    assert_same_translations(data_dir, full, [kept, merged])


def test_extracted_token_target_keeps_encoder_experts_and_k_decoder_experts(trained, tmp_path):
    full = trained.get("token", "target")
    extract(full, "--lang-pair", "en-de", "--output", str(tmp_path / "en-de.pt"))
    state = safe_torch_load(str(tmp_path / "en-de.pt"))
    args = state["cfg"]["model"]
    assert args.moe_extracted_lang_pair == "en-de"
    encoder_experts = {key.split(".")[5] for key in state["model"] if key.startswith("encoder.layers.1.moe.experts.")}
    decoder_experts = {key.split(".")[5] for key in state["model"] if key.startswith("decoder.layers.1.moe.experts.")}
    assert len(encoder_experts) == args.moe_expert_count == 4
    assert len(decoder_experts) == args.moe_top_k == 2
    assert not any(key.startswith("decoder.layers.1.moe.gate") for key in state["model"])
    assert "last_optimizer_state" not in state
    report = json.load(open(tmp_path / "en-de.report.json"))
    assert [row["layer"] for row in report["layers"]] == ["decoder.1"]
    assert report["params_after"] < report["params_before"]


def test_interactive_on_extracted_checkpoint_matches_full_model(trained, data_dir, tmp_path):
    full = trained.get("token", "target")
    extract(full, "--lang-pair", "fr-en", "--output", str(tmp_path / "fr-en.pt"), "--merge-experts")
    source_lines = open(os.path.join(data_dir, "spm", "test.en-fr.fr")).read().splitlines()[:6]

    def interactive(checkpoint):
        command = ["fairseq-interactive", data_dir, *TASK_ARGS, "--source-lang", "fr", "--target-lang", "en",
                   "--path", checkpoint, "--beam", "4", "--max-len-b", "20", "--cpu"]
        return [line for line in run(command, stdin="\n".join(source_lines) + "\n").stdout.splitlines() if line.startswith("H-")]

    full_hypotheses = interactive(full)
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
    result = run(command)
    log = result.stdout + result.stderr
    assert "loading pretrained model from" in log.lower() or "finetune" in log.lower()
    assert os.path.exists(tmp_path / "ft" / "checkpoint_last.pt")


def test_report_for_32_experts_shows_decoder_layers_shrinking_by_e_over_k(trained, tmp_path):
    full = trained.get("token", "target", 1, ("--moe-expert-count", "32"))
    result = extract(full, "--lang-pair", "de-en", "--report-only")
    assert "32 -> 2" in result.stdout
    assert not list(tmp_path.iterdir())
    state = safe_torch_load(full)
    expert_params = sum(t.numel() for k, t in state["model"].items() if k.startswith("decoder.layers.1.moe.experts."))
    from taskmoe_fairseq.extract import extract_pair

    _, rows = extract_pair(state["cfg"]["model"], state["model"], "de-en", merge=False)
    (row,) = rows
    assert row["experts_before"] == 32 and len(row["experts_kept"]) == 2
    assert row["params_before"] >= expert_params
    assert row["params_before"] / row["params_after"] >= 32 / 2
