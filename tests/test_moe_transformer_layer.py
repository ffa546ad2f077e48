"""The MoE layers' explicit forwards against fairseq's own layers.

An MoE of one expert with weight 1 that holds a dense layer's ``fc1``/``fc2`` computes
that dense FFN, so :class:`MoeEncoderLayer` / :class:`MoeDecoderLayer` given the dense
layer's other parameters must return what fairseq's ``TransformerEncoderLayerBase`` /
``TransformerDecoderLayerBase`` return: pre- and post-norm, padding, ``return_fc``,
encoder attention and its weights, incremental decoding, the ``--scale-*`` options,
cross-self-attention, and dropout in training (the same random draws in the same order).
"""

import argparse
import os

import pytest
import torch
from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq_cli import train

from cli_helpers import run_in_process, train_command
from model_helpers import build_model, model_args
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.models.moe_options import check_quant_noise
from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.moe_transformer_layer import AUX_OUTPUTS, MoeDecoderLayer, MoeEncoderLayer
from taskmoe_fairseq.modules.token_gate import TokenTopKGate

T, S, B = 5, 7, 3
#: one expert: a token gate over it, a per-sentence decision for it, or an extracted one
KINDS = ("token", "sentence", "extracted")


def config(normalize_before: bool, dropout: float = 0.0, **overrides) -> TransformerConfig:
    args = model_args(
        encoder_normalize_before=normalize_before,
        decoder_normalize_before=normalize_before,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        **overrides,
    )
    return TransformerConfig.from_namespace(args)


def one_expert(kind: str, cfg: TransformerConfig):
    dim, ffn = cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim
    if kind == "extracted":
        return ExtractedFeedForward(dim, ffn, 1, cfg.activation_fn, cfg.activation_dropout)
    gate = TokenTopKGate(dim, 1, 1) if kind == "token" else None
    return MoeFeedForward(dim, ffn, 1, gate, cfg.activation_fn, cfg.activation_dropout)


def routing(kind: str, batch: int = B) -> dict:
    if kind != "sentence":
        return {}
    return {
        "moe_expert_index": torch.zeros(batch, 1, dtype=torch.long),
        "moe_expert_weight": torch.ones(batch, 1),
    }


#: a full MoE layer's stacked experts (StackedExperts, one expert here) and the dense FFN's names
STACKED_AS_DENSE = {"moe.experts.fc1_weight": "fc1.weight", "moe.experts.fc1_bias": "fc1.bias",
                    "moe.experts.fc2_weight": "fc2.weight", "moe.experts.fc2_bias": "fc2.bias"}


def moe_copy_of(dense, moe_layer):
    """Load ``dense``'s parameters into ``moe_layer``: every parameter by its own name, the
    dense FFN into expert 0. Checks that the names are fairseq's: all but the MoE's own match."""
    dense_state = dense.state_dict()
    state = moe_layer.state_dict()
    unmatched = set()

    def dense_name(key):  # an extracted layer's expert 0 (fairseq's names), or row 0 of a full layer's stack
        return STACKED_AS_DENSE.get(key, key.replace("moe.experts.0.", ""))

    for key in state:
        source = dense_name(key)
        if source in dense_state:
            state[key] = dense_state[source].unsqueeze(0) if key in STACKED_AS_DENSE else dense_state[source]
        else:
            unmatched.add(key)
    assert unmatched <= {"moe.gate.wg.weight", "moe.expert_weights"}, unmatched
    assert {key for key in dense_state if key not in {dense_name(k) for k in state}} == set()
    moe_layer.load_state_dict(state)
    return moe_layer


def strip_aux(kind, out, dense_outputs: int):
    """The MoE layer's output less the aux tensors a token-routed layer appends (checked)."""
    if kind != "token":
        return out
    outputs = out if isinstance(out, tuple) else (out,)
    assert len(outputs) == dense_outputs + AUX_OUTPUTS
    gate_loss, load, dropped = outputs[dense_outputs:]
    assert load.tolist() == [1.0] and float(dropped) == 0.0 and gate_loss.dim() == 0
    rest = outputs[:dense_outputs]
    return rest[0] if dense_outputs == 1 else rest


def padding(batch: int, length: int, pads: int = 2):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, :pads] = True  # left-padded, as fairseq's sources
    return mask


def assert_same(got, want, skipped_pads=None):
    """``got`` equals ``want``, tensor by tensor; ``skipped_pads`` ``[B, T]``: positions a token-routed
    MoE does not run (its output there is 0, fairseq's FFN of a pad; nothing reads either), left out."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, skipped_pads)
    elif want is None:
        assert got is None
    else:
        if skipped_pads is not None and want.shape[:2] == skipped_pads.t().shape:
            got, want = got[~skipped_pads.t()], want[~skipped_pads.t()]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("return_fc", [False, True])
@pytest.mark.parametrize("normalize_before", [False, True])
def test_encoder_layer_is_fairseqs_with_the_moe_where_the_ffn_was(normalize_before, return_fc, kind):
    cfg = config(normalize_before)
    torch.manual_seed(0)
    dense = TransformerEncoderLayerBase(cfg, return_fc=return_fc).eval()
    layer = moe_copy_of(dense, MoeEncoderLayer(cfg, one_expert(kind, cfg), "encoder.0", return_fc=return_fc).eval())
    x, mask = torch.randn(S, B, cfg.encoder.embed_dim), padding(B, S)
    attn_mask = torch.zeros(S, S, dtype=torch.bool)
    attn_mask[:, -1] = True  # strided attention: nobody attends to the last position
    with torch.no_grad():
        for kwargs in ({"encoder_padding_mask": mask}, {"encoder_padding_mask": None, "attn_mask": attn_mask}):
            want = dense(x, **kwargs)
            got = strip_aux(kind, layer(x, **kwargs, **routing(kind)), 2 if return_fc else 1)
            assert_same(got, want, kwargs["encoder_padding_mask"] if kind == "token" else None)


def decoder_pair(cfg, kind, seed=0):
    torch.manual_seed(seed)
    dense = TransformerDecoderLayerBase(cfg).eval()
    layer = moe_copy_of(dense, MoeDecoderLayer(cfg, one_expert(kind, cfg), "decoder.0").eval())
    return dense, layer


DECODER_OPTIONS = {
    "plain": {},
    "scale-options": {"scale_attn": True, "scale_heads": True, "scale_resids": True},
    "cross-self-attention": {"cross_self_attention": True},
}


@pytest.mark.parametrize("options", DECODER_OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize_before", [False, True])
def test_decoder_layer_is_fairseqs_in_one_pass_and_step_by_step(normalize_before, kind, options):
    cfg = config(normalize_before, **DECODER_OPTIONS[options])
    dense, layer = decoder_pair(cfg, kind)
    if options == "scale-options":  # not their initial ones, so that they act
        with torch.no_grad():
            for module in (dense, layer):
                module.c_attn.copy_(torch.linspace(0.5, 1.5, module.nh))
                module.w_resid.copy_(torch.linspace(0.5, 1.5, module.embed_dim))
    dim = cfg.decoder.embed_dim
    x, encoder_out = torch.randn(T, B, dim), torch.randn(S, B, dim)
    encoder_mask, target_mask = padding(B, S), torch.zeros(B, T, dtype=torch.bool)
    target_mask[1, -2:] = True  # right-padded decoder input
    future = torch.triu(torch.full((T, T), float("-inf")), 1)
    with torch.no_grad():
        # the whole sequence, with the encoder attention's per-head weights (alignment)
        kwargs = dict(self_attn_mask=future, self_attn_padding_mask=target_mask, need_attn=True, need_head_weights=True)
        want = dense(x, encoder_out, encoder_mask, None, **kwargs)
        got = strip_aux(kind, layer(x, encoder_out, encoder_mask, None, **kwargs, **routing(kind)), 3)
        assert want[1] is not None and want[1].shape == (cfg.decoder.attention_heads, B, T, S)
        assert_same(got, want, target_mask if kind == "token" else None)
        # incremental decoding: one position at a time, attention state in incremental_state
        dense_state, moe_state = {}, {}
        for t in range(T):
            step = x[t: t + 1]
            want_step = dense(step, encoder_out, encoder_mask, dense_state)
            got_step = strip_aux(kind, layer(step, encoder_out, encoder_mask, moe_state, **routing(kind)), 3)
            assert_same(got_step, want_step)
        assert len(moe_state) == len(dense_state) > 0  # the same attention buffers were kept


@pytest.mark.parametrize("kind", ["sentence", "extracted"])
@pytest.mark.parametrize("normalize_before", [False, True])
def test_dropout_in_training_is_fairseqs(normalize_before, kind):
    """With every dropout on, the same seed gives the same output: the layer drops where fairseq's
    does (attention, after each sublayer, the FFN's activation), once each."""
    cfg = config(normalize_before, dropout=0.3)
    torch.manual_seed(0)
    dense = TransformerEncoderLayerBase(cfg).train()
    encoder = moe_copy_of(dense, MoeEncoderLayer(cfg, one_expert(kind, cfg), "encoder.0").train())
    dense_decoder, decoder = decoder_pair(cfg, kind)
    dense_decoder.train(), decoder.train()
    x, memory = torch.randn(S, B, cfg.encoder.embed_dim), torch.randn(S, B, cfg.encoder.embed_dim)
    for run_dense, run_moe in (
        (lambda: dense(x, None), lambda: encoder(x, None, **routing(kind))),
        (lambda: dense_decoder(x, memory)[0], lambda: decoder(x, memory, **routing(kind))[0]),
    ):
        torch.manual_seed(1)
        want = run_dense()
        torch.manual_seed(1)
        got = run_moe()
        torch.manual_seed(2)
        other = run_moe()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(other, want)  # dropout is really on


def test_moe_layers_have_no_dense_ffn():
    model, _ = build_model("token", "target")
    for layer in (model.encoder.layers[1], model.decoder.layers[1]):
        assert not any(hasattr(layer, name) for name in ("fc1", "fc2", "activation_fn", "activation_dropout_module"))
        assert all(key.startswith("moe.") for key in layer.state_dict() if "fc1" in key or "fc2" in key)


QUANT_NOISE_REFUSAL = "--quant-noise-pq 0.1 is not supported with MoE layers"


@pytest.mark.parametrize("routing", [("token", "target"), ("target", "token")])
def test_quant_noise_is_refused_when_training_starts(data_dir, tmp_path, routing):
    """Was silently dropped for the experts (``build_fc1`` ignored it): fairseq-train's ``main``
    stops with one line when the task builds the model, before anything is written."""
    save_dir = tmp_path / "ckpt"
    moe_side = "encoder" if routing[0] == "token" else "decoder"  # the other side dense: one MoE side is enough
    dense_side = "decoder" if moe_side == "encoder" else "encoder"
    command = train_command(data_dir, str(save_dir), *routing, 1, ("--quant-noise-pq", "0.1", f"--{dense_side}-moe-freq", "0"))
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), command[1:]))
    with pytest.raises(TaskMoeError) as refused:
        train.main(cfg)
    message = str(refused.value)
    assert message.startswith(QUANT_NOISE_REFUSAL) and "drop --quant-noise-pq" in message and "\n" not in message
    assert not save_dir.exists() or os.listdir(save_dir) == []


def test_quant_noise_refusal_is_one_line_from_the_command(data_dir, tmp_path):
    command = train_command(data_dir, str(tmp_path / "ckpt"), "token", "target", 1, ("--quant-noise-pq", "0.1"))
    result = run_in_process(command, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"taskmoe-fairseq: error: {QUANT_NOISE_REFUSAL}")


def test_quant_noise_stays_for_dense_models_and_checkpoints_still_load(trained, data_dir):
    check_quant_noise(model_args(quant_noise_pq=0.1, encoder_moe_freq=0, decoder_moe_freq=0))  # fairseq's transformer
    check_quant_noise(argparse.Namespace(quant_noise_pq=0.1))  # --arch transformer: no MoE options at all
    # the noise acts only in training: a model built from a checkpoint whose args carry it is not refused
    _, cfg, task = checkpoint_utils.load_model_ensemble_and_task([trained.get("token", "target")], arg_overrides={"data": data_dir})
    cfg.model.quant_noise_pq = 0.1
    model = task.build_model(cfg.model, from_checkpoint=True)  # as fairseq's load_model_ensemble builds it
    assert isinstance(model.encoder.layers[1], MoeEncoderLayer)
    with pytest.raises(TaskMoeError, match=QUANT_NOISE_REFUSAL):
        task.build_model(cfg.model)  # as fairseq-train builds it
