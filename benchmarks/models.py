"""The models and inputs every benchmark measures, built once here.

Untrained weights, the same shape and the same inputs for every model. Keys:

* ``dense``: fairseq's transformer (``taskmoe_transformer`` with MoE frequency 0);
* ``dense_kffn``: the same with FFN width K*ffn in the MoE positions (the active shape of
  an extracted model);
* ``full_token_token``: token-routed MoE in encoder and decoder (GShard);
* ``full_token_target``: the paper's best TaskMoE, token-routed encoder, target-routed decoder;
* ``extracted`` / ``extracted_merged``: ``full_token_target.extract("en-de", merge=...)``.
"""

import argparse
import gc
import logging
import os
import sys
import types
import warnings
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)  # fairseq's attention-mask dtype notice
logging.disable(logging.WARNING)  # fairseq / plugin INFO lines would drown the progress output

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402

import taskmoe_fairseq  # noqa: E402,F401  (registers the plugin)
from taskmoe_fairseq.models.moe_options import is_moe_layer  # noqa: E402
from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel, taskmoe_base_architecture  # noqa: E402
from taskmoe_fairseq.modules.routing_kinds import language_index  # noqa: E402

logging.disable(logging.NOTSET)
# The libraries' objects live as long as the process: move them out of the garbage collector's
# view (gc.freeze), so that the full collections before each timed round (timing.py) and any
# collection inside a timed run scan only what the benchmark itself made. Each costs about 0.3 s
# with torch + fairseq imported, far more than the tiny models' runs.
gc.collect()
gc.freeze()
for _name in ("fairseq", "taskmoe_fairseq", "matplotlib"):
    logging.getLogger(_name).setLevel(logging.WARNING)

LANGS = ["en", "de", "fr", "es", "ru", "ja", "zh"]
TRAIN_PAIRS = [f"en-{x}" for x in LANGS[1:]] + [f"{x}-en" for x in LANGS[1:]]
SERVE_PAIR = "en-de"

SHAPE = dict(embed_dim=256, ffn_dim=1024, heads=4, layers=6, moe_freq=2, top_k=2, vocab=8000, src_len=20)
# --tiny: for the smoke test only (seconds, not a measurement)
TINY_SHAPE = dict(embed_dim=16, ffn_dim=32, heads=2, layers=2, moe_freq=2, top_k=2, vocab=40, src_len=8)
EXPERTS = [8, 32, 128]

LABELS = {
    "dense": "dense (ffn)",
    "dense_kffn": "dense (K*ffn in MoE slots)",
    "full_token_token": "full token/token MoE",
    "full_token_target": "full token/target TaskMoE",
    "extracted": "extracted en-de",
    "extracted_merged": "extracted en-de, merged",
}
DENSE_KEYS = ("dense", "dense_kffn")
MOE_ROUTING = {"full_token_token": ("token", "token"), "full_token_target": ("token", "target")}


def add_common_args(parser: argparse.ArgumentParser, default_out: str, quick_experts: str):
    parser.add_argument("--out", default=default_out, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help=f"fewer rounds, E = {quick_experts} (a smoke run, noisy)")
    parser.add_argument("--tiny", action="store_true", help="a minuscule model shape (for tests/test_benchmarks.py)")
    parser.add_argument("--experts", help="comma-separated expert counts (default 8,32,128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)")


def shape_and_experts(options, quick_experts: List[int]) -> (dict, List[int]):
    shape = dict(TINY_SHAPE if options.tiny else SHAPE)
    if options.experts:
        experts = [int(e) for e in options.experts.split(",")]
    else:
        experts = list(quick_experts if options.quick else EXPERTS)
    return shape, experts


def build_dictionary(vocab: int) -> Dictionary:
    dictionary = Dictionary()  # 4 specials
    for index in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{index}")
    return dictionary


def fake_task(dictionary: Dictionary):
    """What ``TaskMoeTransformerModel.build_model`` reads from a task."""
    return types.SimpleNamespace(
        source_dictionary=dictionary, target_dictionary=dictionary, langs=list(LANGS), provides_language_ids=True
    )


def model_args(shape: dict, encoder_routing="token", decoder_routing="target", experts=8, moe_freq=None, dropout=0.1):
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    TaskMoeTransformerModel.add_args(parser)
    args = parser.parse_args([])
    freq = shape["moe_freq"] if moe_freq is None else moe_freq
    args.encoder_moe_routing, args.decoder_moe_routing = encoder_routing, decoder_routing
    args.moe_expert_count, args.moe_top_k = experts, shape["top_k"]
    args.encoder_moe_freq = args.decoder_moe_freq = freq
    args.encoder_embed_dim = args.decoder_embed_dim = shape["embed_dim"]
    args.encoder_ffn_embed_dim = args.decoder_ffn_embed_dim = shape["ffn_dim"]
    args.encoder_attention_heads = args.decoder_attention_heads = shape["heads"]
    args.encoder_layers = args.decoder_layers = shape["layers"]
    args.share_all_embeddings = True  # one shared multilingual vocabulary, as in the paper
    args.dropout = dropout
    args.lang_pairs = ",".join(TRAIN_PAIRS)
    taskmoe_base_architecture(args)
    return args


def widen_moe_slots(model: TaskMoeTransformerModel, shape: dict):
    """Give the dense layers at the MoE positions an FFN of width K*ffn (fairseq's own
    ``build_fc1``/``build_fc2``): the shape ``merge=True`` extraction produces."""
    probe = argparse.Namespace(encoder_moe_freq=shape["moe_freq"], decoder_moe_freq=shape["moe_freq"])
    width = shape["top_k"] * shape["ffn_dim"]
    for side in ("encoder", "decoder"):
        for index, layer in enumerate(getattr(model, side).layers):
            if is_moe_layer(probe, side, index):
                layer.fc1 = layer.build_fc1(shape["embed_dim"], width, 0.0, 8)
                layer.fc2 = layer.build_fc2(width, shape["embed_dim"], 0.0, 8)
    return model


def build(spec: dict, shape: dict, task, seed: int = 0) -> nn.Module:
    """``spec``: {"key": one of LABELS, "E": experts, "dropout": optional,
    "enc"/"dec": routing for a training model (key "moe")}.

    The extracted models are built from their args (``moe_extracted_lang_pair``): the
    structure a checkpoint written by ``model.extract`` loads into."""
    torch.manual_seed(seed)
    key, dropout = spec["key"], spec.get("dropout", 0.1)
    if key in DENSE_KEYS:
        args = model_args(shape, experts=max(2, shape["top_k"]), moe_freq=0, dropout=dropout)
        model = TaskMoeTransformerModel.build_model(args, task)
        return widen_moe_slots(model, shape) if key == "dense_kffn" else model
    enc, dec = MOE_ROUTING.get(key, (spec.get("enc", "token"), spec.get("dec", "target")))
    args = model_args(shape, enc, dec, spec["E"], dropout=dropout)
    if key.startswith("extracted"):
        args.moe_extracted_lang_pair = SERVE_PAIR
        args.moe_merged_experts = key == "extracted_merged"
    return TaskMoeTransformerModel.build_model(args, task)


def serving_models(shape: dict, task, experts: int) -> Dict[str, nn.Module]:
    """The four E-dependent serving models (eval mode); extraction through ``model.extract``."""
    models = {key: build({"key": key, "E": experts}, shape, task).eval() for key in MOE_ROUTING}
    for key, merge in (("extracted", False), ("extracted_merged", True)):
        models[key] = models["full_token_target"].extract(SERVE_PAIR, merge=merge)[0].eval()
    return models


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def decoder_expert_params(model: nn.Module):
    """Parameters of the decoder's MoE-slot FFNs (experts or merged expert); None if dense."""
    moes = [layer.moe for layer in model.decoder.layers if getattr(layer, "moe", None) is not None]
    return sum(p.numel() for moe in moes for p in moe.experts.parameters()) if moes else None


def decode_inputs(shape: dict, dictionary: Dictionary, batch: int, seed: int = 1) -> Dict[str, torch.Tensor]:
    """Left-padded sources of length src_len-6..src_len, all en->de (one pair per serving batch)."""
    generator = torch.Generator().manual_seed(seed)
    longest = shape["src_len"]
    lengths = torch.randint(max(2, longest - 6), longest + 1, (batch,), generator=generator)
    lengths[0] = longest
    src = torch.full((batch, longest), dictionary.pad(), dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        src[row, longest - length:] = torch.randint(dictionary.nspecial, len(dictionary), (length,), generator=generator)
        src[row, -1] = dictionary.eos()
    return {
        "src_tokens": src,
        "src_lengths": lengths,
        "src_lang_id": torch.full((batch,), language_index(LANGS, "en"), dtype=torch.long),
        "tgt_lang_id": torch.full((batch,), language_index(LANGS, "de"), dtype=torch.long),
    }


def single_sentence_inputs(batch_inputs: Dict[str, torch.Tensor], dictionary: Dictionary, count: int) -> List[dict]:
    """The first ``count`` sentences of the batch, each as its own unpadded batch of one."""
    out = []
    for row in range(count):
        tokens = batch_inputs["src_tokens"][row]
        tokens = tokens[tokens.ne(dictionary.pad())][None, :]
        out.append({
            "src_tokens": tokens,
            "src_lengths": torch.tensor([tokens.size(1)]),
            "src_lang_id": batch_inputs["src_lang_id"][row: row + 1],
            "tgt_lang_id": batch_inputs["tgt_lang_id"][row: row + 1],
        })
    return out


def training_sample(shape: dict, dictionary: Dictionary, sentences: int, seed: int = 2) -> dict:
    """A mixed multilingual batch: each sentence has a random pair from TRAIN_PAIRS."""
    generator = torch.Generator().manual_seed(seed)
    longest = shape["src_len"]
    pad, eos, low = dictionary.pad(), dictionary.eos(), dictionary.nspecial
    src = torch.full((sentences, longest), pad, dtype=torch.long)
    tgt = torch.full((sentences, longest), pad, dtype=torch.long)
    prev = torch.full((sentences, longest), pad, dtype=torch.long)
    src_lengths = []
    shortest = max(2, longest - 8)
    for row in range(sentences):
        s_len = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
        t_len = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
        src[row, longest - s_len:] = torch.randint(low, len(dictionary), (s_len,), generator=generator)
        src[row, -1] = eos
        words = torch.randint(low, len(dictionary), (t_len - 1,), generator=generator)
        tgt[row, :t_len] = torch.cat([words, torch.tensor([eos])])
        prev[row, :t_len] = torch.cat([torch.tensor([eos]), words])
        src_lengths.append(s_len)
    pairs = torch.randint(0, len(TRAIN_PAIRS), (sentences,), generator=generator).tolist()
    src_ids = torch.tensor([language_index(LANGS, TRAIN_PAIRS[p].split("-")[0]) for p in pairs])
    tgt_ids = torch.tensor([language_index(LANGS, TRAIN_PAIRS[p].split("-")[1]) for p in pairs])
    return {
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.tensor(src_lengths),
            "prev_output_tokens": prev,
            "src_lang_id": src_ids,
            "tgt_lang_id": tgt_ids,
        },
        "target": tgt,
        "ntokens": int(tgt.ne(pad).sum()),
        "nsentences": sentences,
    }
