"""Extraction as a model operation: the extracted sub-network generates exactly the full
model's hypotheses, in-process, for every routing, dtype and search (fairseq's own
SequenceGenerator, beam 4 and greedy, a batch of mixed source lengths)."""

import copy

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from model_helpers import build_model, tiny_dictionary
from taskmoe_fairseq.errors import TaskMoeError

# every extractable routing (source, target, pair, static-*) is extracted in at least one
# case; token and sentence routing stay whole on the other side
CASES = [
    ("token", "target"),
    ("target", "target"),
    ("pair", "pair"),
    ("source", "static-target"),
    ("static-source", "sentence"),
    ("sentence", "static-pair"),
    ("static-pair", "source"),
    ("target", "target", "softmax"),  # --moe-task-gate-weights softmax: weights that do not sum to 1
]
PAIR, SRC, TGT = "fr-de", 2, 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def mixed_length_batch(dictionary, batch=6, seed=3):
    generator = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 7, 2, 9, 5][:batch]
    src = torch.full((batch, max(lengths)), dictionary.pad())
    for row, length in enumerate(lengths):  # left-padded, as fairseq's multilingual task does
        src[row, -length:] = torch.randint(dictionary.nspecial, len(dictionary), (length,), generator=generator)
        src[row, -1] = dictionary.eos()
    return {
        "src_tokens": src,
        "src_lengths": torch.tensor(lengths),
        "src_lang_id": torch.full((batch,), SRC),
        "tgt_lang_id": torch.full((batch,), TGT),
    }


def hypotheses(model, dictionary, batch, beam):
    generator = SequenceGenerator([model], dictionary, beam_size=beam, max_len_b=15)
    with torch.no_grad():
        out = generator.generate([model], {"net_input": dict(batch)})
    return [[(h["tokens"].tolist(), float(h["score"])) for h in sentence] for sentence in out]


@pytest.fixture(scope="module")
def models():
    """Each routing's full model and its plain and merged extractions, built once."""
    dictionary = tiny_dictionary(40)
    built = {}
    for routing in CASES:
        from model_helpers import fake_task

        encoder, decoder, *weights = routing
        overrides = {"moe_task_gate_weights": weights[0]} if weights else {}
        full, _ = build_model(encoder, decoder, task=fake_task(dictionary), **overrides)
        full.eval()
        plain, rows = full.extract(PAIR)
        merged, _ = full.extract(PAIR, merge=True)
        built[routing] = (full, plain.eval(), merged.eval(), rows)
    return dictionary, built


@pytest.mark.parametrize("routing", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extracted_model_generates_the_full_models_hypotheses(models, routing, dtype):
    dictionary, built = models
    full, plain, merged, rows = built[routing]
    assert rows and all(len(row["experts_kept"]) == 2 for row in rows)
    full, plain = copy.deepcopy(full).to(dtype), copy.deepcopy(plain).to(dtype)
    batch = mixed_length_batch(dictionary)
    for beam in (1, 4):
        want = hypotheses(full, dictionary, batch, beam)
        assert hypotheses(plain, dictionary, batch, beam) == want, (routing, dtype, beam)
        if dtype == torch.float32:
            # merging folds the weights into fc2: exact in real arithmetic, equal up to float rounding
            got = hypotheses(merged, dictionary, batch, beam)
            assert [[tokens for tokens, _ in s] for s in got] == [[tokens for tokens, _ in s] for s in want]
            for s_got, s_want in zip(got, want):
                for (_, a), (_, b) in zip(s_got, s_want):
                    assert abs(a - b) < 1e-4



@pytest.mark.parametrize("routing", CASES)
def test_full_and_extracted_models_agree_under_autocast(models, routing):
    """fairseq's ``--amp`` (here CPU autocast, bfloat16): the experts run in low precision in both
    models, the gates in float32 (autocast turned off for them), so the full model's task-routed
    weights are the frozen ones of the extraction and both give the same hypotheses."""
    from model_helpers import random_batch

    dictionary, built = models
    full, plain, _, _ = built[routing]
    batch = mixed_length_batch(dictionary)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for beam in (1, 4):
            assert hypotheses(plain, dictionary, batch, beam) == hypotheses(full, dictionary, batch, beam), (routing, beam)
        with torch.no_grad():
            _, extra = full(**random_batch(dictionary))
    assert extra["moe_aux"] and all(
        aux.gate_loss.dtype == aux.expert_load.dtype == torch.float32 for aux in extra["moe_aux"]
    ), [(aux.layer, aux.gate_loss.dtype) for aux in extra["moe_aux"]]

def test_extracted_model_refuses_another_pair_on_every_call(models):
    dictionary, built = models
    full, plain, _, _ = built[("token", "target")]
    batch = mixed_length_batch(dictionary)
    batch["tgt_lang_id"] = torch.tensor([TGT, TGT, 0, TGT, TGT, TGT])  # one sentence asks for fr-en
    with pytest.raises(TaskMoeError, match="is the fr-de sub-network; it cannot translate fr-en .*extract fr-en"):
        hypotheses(plain, dictionary, batch, 1)
    # target routing: the fr-de decoder experts are en-de's too (same task), so en-de is served
    batch = mixed_length_batch(dictionary)
    batch["src_lang_id"][:] = 0
    assert hypotheses(plain, dictionary, batch, 1) == hypotheses(full, dictionary, batch, 1)


def test_extraction_is_refused_when_nothing_is_task_routed_or_already_done(models):
    _, built = models
    with pytest.raises(TaskMoeError, match="already extracted for fr-de"):
        built[("target", "target")][1].extract("en-de")
    token_token, _ = build_model("token", "token")
    with pytest.raises(TaskMoeError, match="nothing to strip"):
        token_token.extract("en-de")
