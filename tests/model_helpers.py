"""Building small taskmoe_transformer models in-process, without data on disk."""

import argparse
import types

import torch
from fairseq.data import Dictionary

import taskmoe_fairseq  # noqa: F401  (registers the plugin, applies compat)
from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel, taskmoe_tiny_architecture

LANGS = ["en", "de", "fr"]


def tiny_dictionary(size: int = 20) -> Dictionary:
    dictionary = Dictionary()
    for index in range(size):
        dictionary.add_symbol(f"w{index}")
    return dictionary


def model_args(encoder_routing="token", decoder_routing="target", **overrides):
    # fairseq's own parser leaves unset model options absent (SUPPRESS), so arch presets apply.
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    TaskMoeTransformerModel.add_args(parser)
    args = parser.parse_args([])
    args.encoder_moe_routing = encoder_routing
    args.decoder_moe_routing = decoder_routing
    args.dropout = 0.0
    for key, value in overrides.items():
        setattr(args, key, value)
    taskmoe_tiny_architecture(args)
    return args


def fake_task(dictionary=None, langs=LANGS, provides_language_ids=True):
    dictionary = dictionary or tiny_dictionary()
    return types.SimpleNamespace(
        source_dictionary=dictionary,
        target_dictionary=dictionary,
        langs=list(langs),
        provides_language_ids=provides_language_ids,
    )


def build_model(encoder_routing="token", decoder_routing="target", seed=0, task=None, **overrides):
    torch.manual_seed(seed)
    task = task or fake_task()
    model = TaskMoeTransformerModel.build_model(model_args(encoder_routing, decoder_routing, **overrides), task)
    return model, task


def random_batch(dictionary, batch=4, src_len=7, tgt_len=6, seed=1):
    """Left-padded sources, right-padded decoder inputs, mixed language pairs."""
    generator = torch.Generator().manual_seed(seed)
    low = dictionary.nspecial
    src = torch.randint(low, len(dictionary), (batch, src_len), generator=generator)
    src[0, :3] = dictionary.pad()
    prev = torch.randint(low, len(dictionary), (batch, tgt_len), generator=generator)
    prev[:, 0] = dictionary.eos()
    prev[1, -2:] = dictionary.pad()
    return {
        "src_tokens": src,
        "src_lengths": src.ne(dictionary.pad()).sum(1),
        "prev_output_tokens": prev,
        "src_lang_id": torch.tensor([0, 1, 0, 2][:batch]),
        "tgt_lang_id": torch.tensor([1, 0, 2, 0][:batch]),
    }
