"""Fill CTranslate2's ``TransformerSpec`` from a dense TaskMoE sub-network.

A sub-network extracted for one language pair (``python -m taskmoe_fairseq.extract
--merge-experts``) is a post- or pre-norm fairseq Transformer in which every former
task-routed or static MoE layer holds one FFN of width ``k * ffn`` (the k kept experts
stacked, the second layer scaled by the frozen gate weights), while the dense layers keep
fairseq's ``fc1``/``fc2`` of width ``ffn``. CTranslate2's spec is invariant to hidden sizes,
so each layer's ``ffn.linear_0``/``linear_1`` simply takes that layer's width.

The weights are read from the checkpoint's state dict by the parameter names fairseq (and the
extract contract) use; nothing is written in CTranslate2's file format by hand: the spec
classes and :class:`ctranslate2.converters.Converter` validate, quantize and save.
Sources: ``ctranslate2.specs.transformer_spec`` (the layer specs), fairseq's
``TransformerEncoderLayerBase``/``TransformerDecoderLayerBase`` (parameter names) and
``SinusoidalPositionalEmbedding.get_embedding`` (the position table).
"""

from typing import Dict, List, Sequence

import numpy as np
import torch
from ctranslate2.converters.converter import Converter
from ctranslate2.specs import common_spec, transformer_spec

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.export.subnetwork import IGNORED_SUFFIXES, DenseLayer, SubNetwork

ACTIVATIONS = {
    "relu": common_spec.Activation.RELU,
    "gelu": common_spec.Activation.GELU,
    "gelu_accurate": common_spec.Activation.GELUTanh,
    "gelu_fast": common_spec.Activation.GELUTanh,
    "swish": common_spec.Activation.SWISH,
}


def as_array(tensor: torch.Tensor) -> np.ndarray:
    """float32, contiguous numpy copy of a checkpoint tensor."""
    return tensor.detach().to(torch.float32).contiguous().numpy().copy()


def sinusoidal_positions(max_positions: int, dim: int, padding_idx: int) -> np.ndarray:
    """fairseq's sinusoidal table ``[max_positions, dim]``, rows for positions 1..max_positions.

    fairseq numbers the first real token ``padding_idx + 1``; CTranslate2 indexes its table from
    0, so the rows up to ``padding_idx`` are dropped."""
    from fairseq.modules.sinusoidal_positional_embedding import SinusoidalPositionalEmbedding

    table = SinusoidalPositionalEmbedding.get_embedding(max_positions + padding_idx + 1, dim, padding_idx)
    return as_array(table[padding_idx + 1:])


class TaskMoeCt2Converter(Converter):
    """CTranslate2 converter for a :class:`SubNetwork` (a dense view of a sub-network).

    Args:
        network: the layers and weights, see :mod:`taskmoe_fairseq.export.subnetwork`.
        source_vocabulary, target_vocabulary: fairseq dictionary symbols in index order
            (``<pad>`` renamed ``<blank>``, CTranslate2's padding token).

    ``convert(output_dir, quantization=...)`` (inherited) validates, quantizes and saves.
    """

    def __init__(self, network: SubNetwork, source_vocabulary: Sequence[str], target_vocabulary: Sequence[str]):
        self.network = network
        self.source_vocabulary = list(source_vocabulary)
        self.target_vocabulary = list(target_vocabulary)
        self.used = set()

    def _load(self):
        net = self.network
        if net.activation_fn not in ACTIVATIONS:
            raise usage_error(
                f"--activation-fn {net.activation_fn} has no CTranslate2 equivalent (supported: {', '.join(ACTIVATIONS)})"
            )
        activation = ACTIVATIONS[net.activation_fn]
        encoder = transformer_spec.TransformerEncoderSpec(
            len(net.encoder_layers), net.encoder_heads, pre_norm=net.encoder_pre_norm,
            no_final_norm=not net.has_final_norm("encoder"), activation=activation,
            layernorm_embedding=net.has_layernorm_embedding("encoder"),
        )
        decoder = transformer_spec.TransformerDecoderSpec(
            len(net.decoder_layers), net.decoder_heads, pre_norm=net.decoder_pre_norm,
            no_final_norm=not net.has_final_norm("decoder"), activation=activation,
            layernorm_embedding=net.has_layernorm_embedding("decoder"),
        )
        self._fill_side(encoder, "encoder")
        self._fill_side(decoder, "decoder")
        self._linear(decoder.projection, "decoder.output_projection")
        self._check_all_used()
        spec = transformer_spec.TransformerSpec(encoder, decoder)
        self._check_vocabulary("source", self.source_vocabulary, "encoder.embed_tokens.weight")
        self._check_vocabulary("target", self.target_vocabulary, "decoder.embed_tokens.weight")
        spec.register_source_vocabulary(self.source_vocabulary)
        spec.register_target_vocabulary(self.target_vocabulary)
        # fairseq: the source ends with </s>; the decoder starts from </s> (no <s> anywhere).
        spec.config.add_source_eos = True
        spec.config.decoder_start_token = "</s>"
        spec.config.layer_norm_epsilon = 1e-5  # fairseq's LayerNorm
        return spec

    # ------------------------------------------------------------------ helpers

    def _tensor(self, name: str) -> np.ndarray:
        if name not in self.network.state:
            raise usage_error(f"the checkpoint has no {name}; this layout is not a fairseq Transformer the exporter knows")
        self.used.add(name)
        return as_array(self.network.state[name])

    def _check_all_used(self):
        """Every parameter must have found a place: anything else (adaptive softmax, project-in/out,
        NormFormer scales ...) would be silently dropped."""
        ffn_prefixes = tuple(
            f"{layer.prefix}.{part}" for layer in self.network.encoder_layers + self.network.decoder_layers
            for part in ("fc1.", "fc2.", "moe.")
        )
        unused = [
            name for name in self.network.state
            if name not in self.used and not name.endswith(IGNORED_SUFFIXES) and not name.startswith(ffn_prefixes)
        ]
        if unused:
            shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
            raise usage_error(f"parameters with no place in CTranslate2's Transformer: {shown}; this model cannot be exported")

    def _linear(self, spec, prefix: str):
        spec.weight = self._tensor(prefix + ".weight")
        if prefix + ".bias" in self.network.state:
            spec.bias = self._tensor(prefix + ".bias")

    def _layer_norm(self, spec, prefix: str):
        spec.gamma = self._tensor(prefix + ".weight")
        spec.beta = self._tensor(prefix + ".bias")

    def _fused(self, spec, prefixes: List[str]):
        """One linear whose output is the concatenation of ``prefixes``' outputs (q, k, v)."""
        state = self.network.state
        spec.weight = np.concatenate([self._tensor(p + ".weight") for p in prefixes], axis=0)
        spec.bias = np.concatenate([self._tensor(p + ".bias") for p in prefixes], axis=0)
        if any(p + ".bias" not in state for p in prefixes):
            raise usage_error("attention projections without bias are not supported by this exporter")

    def _attention(self, spec, prefix: str, self_attention: bool):
        names = [f"{prefix}.{p}_proj" for p in ("q", "k", "v")]
        if self_attention:
            self._fused(spec.linear[0], names)
        else:
            self._linear(spec.linear[0], names[0])
            self._fused(spec.linear[1], names[1:])
        self._linear(spec.linear[-1], f"{prefix}.out_proj")

    def _ffn(self, spec, layer: DenseLayer):
        self._layer_norm(spec.layer_norm, f"{layer.prefix}.final_layer_norm")
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = layer.ffn
        spec.linear_0.weight, spec.linear_0.bias = as_array(fc1_weight), as_array(fc1_bias)
        spec.linear_1.weight, spec.linear_1.bias = as_array(fc2_weight), as_array(fc2_bias)

    def _fill_side(self, spec, side: str):
        net = self.network
        embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
        embeddings.weight = self._tensor(f"{side}.embed_tokens.weight")
        spec.scale_embeddings = not net.args_flag("no_scale_embedding")
        learned = f"{side}.embed_positions.weight"
        if learned in net.state:
            spec.position_encodings.encodings = self._tensor(learned)[net.padding_idx + 1:]
        else:
            spec.position_encodings.encodings = sinusoidal_positions(
                net.max_positions(side), embeddings.weight.shape[1], net.padding_idx
            )
        if net.has_final_norm(side):
            self._layer_norm(spec.layer_norm, f"{side}.layer_norm")
        if net.has_layernorm_embedding(side):
            self._layer_norm(spec.layernorm_embedding, f"{side}.layernorm_embedding")
        for layer_spec, layer in zip(spec.layer, getattr(net, f"{side}_layers")):
            self._attention(layer_spec.self_attention, f"{layer.prefix}.self_attn", self_attention=True)
            self._layer_norm(layer_spec.self_attention.layer_norm, f"{layer.prefix}.self_attn_layer_norm")
            if side == "decoder":
                self._attention(layer_spec.attention, f"{layer.prefix}.encoder_attn", self_attention=False)
                self._layer_norm(layer_spec.attention.layer_norm, f"{layer.prefix}.encoder_attn_layer_norm")
            self._ffn(layer_spec.ffn, layer)

    def _check_vocabulary(self, which: str, vocabulary: List[str], embedding: str):
        rows = self.network.state[embedding].shape[0]
        if len(vocabulary) != rows:
            raise usage_error(
                f"the {which} dictionary has {len(vocabulary)} symbols but the model's {embedding} has {rows} rows; "
                "pass the --data-dir the model was trained on"
            )


def layer_summary(network: SubNetwork) -> List[Dict]:
    """``[{"layer": "decoder.1", "ffn_dim": 256, "from": "..."}]`` for the conventions file."""
    return [
        {"layer": layer.name, "ffn_dim": int(layer.ffn[0].shape[0]), "from": layer.origin}
        for layer in network.encoder_layers + network.decoder_layers
    ]
