import pytest
import torch
from fairseq.models.transformer import TransformerModel

from model_helpers import build_model, fake_task, model_args, random_batch
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.modules import routing_kinds

ROUTINGS = routing_kinds.ROUTING_CHOICES


# every routing on each side, against three different routings on the other (24 of the 64 pairs)
COMBINATIONS = [(ROUTINGS[i], ROUTINGS[(i + shift) % len(ROUTINGS)]) for shift in (0, 3, 5) for i in range(len(ROUTINGS))]


@pytest.mark.parametrize("encoder_routing,decoder_routing", COMBINATIONS)
def test_forward_and_backward_for_every_routing_combination(encoder_routing, decoder_routing):
    model, task = build_model(encoder_routing, decoder_routing)
    model.train()
    batch = random_batch(task.source_dictionary)
    logits, extra = model(**batch)
    assert logits.shape == (4, 6, len(task.target_dictionary))
    assert torch.isfinite(logits).all()
    aux = extra["moe_aux"]  # the gate losses come with the output, one per MoE layer
    assert sorted(a.layer for a in aux) == ["decoder.1", "encoder.1"]
    (logits.logsumexp(-1).mean() + 0.01 * sum(a.gate_loss for a in aux)).backward()
    assert [name for name, _ in model.moe_layers()] == ["encoder.1", "decoder.1"]
    assert model.encoder.embed_tokens.weight.grad is not None
    gates = [moe.gate for _, moe in model.moe_layers() if moe.routes_tokens] + list(model.encoder.moe_router.gates.values())
    assert len(gates) == 2
    for gate in gates:
        if gate.__class__.__name__ != "StaticTaskGate":
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


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
    with pytest.raises(TaskMoeError, match="--moe-top-k 5 must be between 1 and --moe-expert-count"):
        build_model(moe_expert_count=4, moe_top_k=5)


def test_task_routing_needs_the_taskmoe_task():
    with pytest.raises(TaskMoeError, match="routes by language; run it with --task multilingual_translation_taskmoe"):
        build_model("token", "target", task=fake_task(provides_language_ids=False))
    build_model("token", "token", task=fake_task(provides_language_ids=False))  # token routing needs no ids


def test_language_order_must_match_the_checkpoint():
    model, _ = build_model()
    args = model.args
    from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

    with pytest.raises(TaskMoeError, match="trained with --langs en,de,fr.*pass --langs en,de,fr"):
        TaskMoeTransformerModel.build_model(args, fake_task(langs=["de", "en", "fr"]))


@pytest.mark.parametrize("option", ["moe_expert_count", "moe_top_k"])
def test_zero_experts_or_zero_top_k_is_an_error_not_the_preset(option):
    with pytest.raises(TaskMoeError, match="--moe-expert-count must be at least 1|--moe-top-k 0 must be between"):
        build_model(**{option: 0})


def test_layerdrop_trains_and_reports_only_the_layers_that_ran():
    model, task = build_model("token", "token", encoder_layerdrop=0.5, decoder_layerdrop=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    names = set()
    for step in range(8):
        model.train()
        batch = random_batch(task.source_dictionary, seed=step)
        logits, extra = model(**batch)
        names.update(a.layer for a in extra["moe_aux"])
        loss = logits.logsumexp(-1).mean() + sum(a.gate_loss for a in extra["moe_aux"])
        optimizer.zero_grad()
        loss.backward()  # a stale gate loss from an earlier step would fail here ("backward ... second time")
        optimizer.step()
        model.eval()
        with torch.no_grad():
            _, extra = model(**batch)
        assert sorted(a.layer for a in extra["moe_aux"]) == ["decoder.1", "encoder.1"]  # no LayerDrop in eval
    assert names <= {"encoder.1", "decoder.1"}


@pytest.mark.parametrize("routing", [("token", "target"), ("sentence", "token")])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(routing):
    results = []
    for checkpoint in (False, True):
        model, task = build_model(*routing, checkpoint_activations=checkpoint)
        model.train()
        batch = random_batch(task.source_dictionary)
        torch.manual_seed(5)
        logits, extra = model(**batch)
        loss = logits.logsumexp(-1).mean() + sum(a.gate_loss for a in extra["moe_aux"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    layer = build_model(*routing, checkpoint_activations=True)[0].decoder.layers[1]
    assert hasattr(layer, "precheckpoint_forward")  # fairseq's wrapper is really applied
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_generation_routes_once_per_batch_not_once_per_decoding_step(monkeypatch):
    """Task and sentence gates run in the encoder's forward; beam search steps reuse the decision."""
    from fairseq.sequence_generator import SequenceGenerator

    from taskmoe_fairseq.modules.sentence_gate import SentenceTopKGate
    from taskmoe_fairseq.modules.task_gate import TaskGate

    calls = []
    for gate_class in (TaskGate, SentenceTopKGate):
        original = gate_class.forward
        monkeypatch.setattr(gate_class, "forward", lambda self, *a, _o=original, **k: calls.append(1) or _o(self, *a, **k))
    model, task = build_model("sentence", "target")
    model.eval()
    batch = random_batch(task.source_dictionary)
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=4, max_len_b=12, min_len=12)
    net_input = {k: batch[k] for k in ("src_tokens", "src_lengths", "src_lang_id", "tgt_lang_id")}
    hypotheses = generator.generate([model], {"net_input": net_input})
    assert len(hypotheses) == 4 and len(hypotheses[0][0]["tokens"]) >= 12
    assert len(calls) == 2  # one encoder gate + one decoder gate, once


def test_checkpoints_with_gates_inside_their_layers_still_load():
    """Before the router, per-sentence gates lived at ``<side>.layers.<i>.moe.gate``."""
    model, task = build_model("sentence", "target")
    model.eval()
    old = {}
    for key, value in model.state_dict().items():
        old[key.replace("encoder.moe_router.gates.decoder_1.", "decoder.layers.1.moe.gate.")
               .replace("encoder.moe_router.gates.encoder_1.", "encoder.layers.1.moe.gate.")] = value
    assert "decoder.layers.1.moe.gate.task_logits" in old
    fresh, _ = build_model("sentence", "target", seed=3)
    fresh.load_state_dict(old)  # fairseq's load_state_dict runs upgrade_state_dict_named
    fresh.eval()
    batch = random_batch(task.source_dictionary)
    with torch.no_grad():
        assert torch.equal(fresh(**batch)[0], model(**batch)[0])


def test_build_logs_the_expert_parameter_count_that_fairseq_train_reports_as_0(caplog):
    """fairseq-train counts ``param.expert`` parameters, a tag only expert parallelism sets (its
    legacy_ddp skips their all-reduce, so tagging them elsewhere would desynchronise replicas):
    the model logs its own count of expert parameters once, at build."""
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="taskmoe_fairseq.models.taskmoe_transformer"):
        model, _ = build_model("token", "target", moe_expert_count=32)
    lines = [r.getMessage() for r in caplog.records if "expert parameters" in r.getMessage()]
    assert len(lines) == 1, lines
    found = re.search(r"expert parameters: ([\d,]+) of ([\d,]+) \((\d+) MoE layers\)", lines[0])
    assert found, lines[0]
    experts, total, layers = (int(group.replace(",", "")) for group in found.groups())
    args = model.args
    per_expert = 2 * args.encoder_embed_dim * args.encoder_ffn_embed_dim + args.encoder_ffn_embed_dim + args.encoder_embed_dim
    assert layers == 2 and experts == layers * 32 * per_expert  # one MoE layer each in the 2+2-layer encoder and decoder
    assert total == sum(p.numel() for p in model.parameters()) and experts < total
    assert sum(p.numel() for p in model.parameters() if getattr(p, "expert", False)) == 0  # fairseq's count
