import itertools

import pytest
import torch
from fairseq.models.transformer import TransformerModel

from model_helpers import build_model, fake_task, model_args, random_batch
from taskmoe_fairseq.modules import routing_kinds

ROUTINGS = routing_kinds.ROUTING_CHOICES


@pytest.mark.parametrize("encoder_routing,decoder_routing", list(itertools.product(ROUTINGS, ROUTINGS)))
def test_forward_and_backward_for_every_routing_combination(encoder_routing, decoder_routing):
    model, task = build_model(encoder_routing, decoder_routing)
    model.train()
    batch = random_batch(task.source_dictionary)
    logits, _ = model(**batch)
    assert logits.shape == (4, 6, len(task.target_dictionary))
    assert torch.isfinite(logits).all()
    gate_loss = sum(moe.last_decision.gate_loss for _, moe in model.moe_layers())
    (logits.logsumexp(-1).mean() + 0.01 * gate_loss).backward()
    assert [name for name, _ in model.moe_layers()] == ["encoder.1", "decoder.1"]
    assert model.encoder.embed_tokens.weight.grad is not None
    for _, moe in model.moe_layers():
        if moe.gate.__class__.__name__ != "StaticTaskGate":
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.gate.parameters())


def test_without_moe_layers_it_is_exactly_fairseqs_transformer():
    model, task = build_model(encoder_moe_freq=0, decoder_moe_freq=0)
    assert list(model.moe_layers()) == []
    reference = TransformerModel.build_model(model_args(encoder_moe_freq=0, decoder_moe_freq=0), task)
    assert set(reference.state_dict()) == set(model.state_dict())
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    batch = random_batch(task.source_dictionary)
    with torch.no_grad():
        ours, _ = model(**batch)
        theirs, _ = reference(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("decoder_routing", ["token", "sentence", "target", "pair", "static-target"])
def test_incremental_decoding_with_reordered_beams_matches_teacher_forcing(decoder_routing):
    """What beam search does: encode, reorder encoder_out to beams, decode step by step."""
    model, task = build_model("token", decoder_routing)
    model.eval()
    batch = random_batch(task.source_dictionary)
    batch["prev_output_tokens"][1, -2:] = 7  # no pads: step-by-step has none either
    new_order = torch.tensor([2, 2, 0, 3, 1, 1])
    with torch.no_grad():
        full, _ = model(**batch)
        encoder_out = model.encoder(
            batch["src_tokens"], batch["src_lengths"], src_lang_id=batch["src_lang_id"], tgt_lang_id=batch["tgt_lang_id"]
        )
        encoder_out = model.encoder.reorder_encoder_out(encoder_out, new_order)
        prev = batch["prev_output_tokens"].index_select(0, new_order)
        state = {}
        steps = [model.decoder(prev[:, : t + 1], encoder_out, incremental_state=state)[0] for t in range(prev.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full.index_select(0, new_order), rtol=1e-4, atol=1e-4)


def test_top_k_above_expert_count_is_a_one_line_error():
    with pytest.raises(SystemExit, match="--moe-top-k 5 must be between 1 and --moe-expert-count"):
        build_model(moe_expert_count=4, moe_top_k=5)


def test_task_routing_needs_the_taskmoe_task():
    with pytest.raises(SystemExit, match="routes by language; run it with --task multilingual_translation_taskmoe"):
        build_model("token", "target", task=fake_task(provides_language_ids=False))
    build_model("token", "token", task=fake_task(provides_language_ids=False))  # token routing needs no ids


def test_language_order_must_match_the_checkpoint():
    model, _ = build_model()
    args = model.args
    from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

    with pytest.raises(SystemExit, match="trained with --langs en,de,fr.*pass --langs en,de,fr"):
        TaskMoeTransformerModel.build_model(args, fake_task(langs=["de", "en", "fr"]))
