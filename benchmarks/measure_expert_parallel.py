"""Bytes the expert-parallel all-to-alls move between ranks, counted, beside the formula; and
parameter memory per rank against P. Writes docs/benchmarks/expert_parallel.json; the markdown
comes from benchmarks/report_expert_parallel.py.

    PYTHONPATH=. python benchmarks/measure_expert_parallel.py --out docs/benchmarks/expert_parallel.json

For each P it starts P gloo ranks (this machine, CPU), builds ``taskmoe_transformer_small``
(3+3 layers, d 256, FFN 1024, one MoE layer per side) with E experts and
``--moe-expert-parallel-size P`` for every routing pair, and on each rank runs one training
step (forward + backward on the same random batch shape: B sentences of S source and T target
tokens, random language pairs) and one decoding step (the decoder on one time step for B
hypotheses, incremental). ``torch.distributed.all_to_all_single`` is wrapped to count the bytes
each rank sends to the other ranks (its own split stays local and is not counted). Nothing here
is timed.
"""

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Run  # noqa: E402

ROUTINGS = (("token", "token"), ("token", "target"), ("target", "target"))
LANGS = ["en", "de", "fr", "ru"]


def build(experts, routing, size, vocab):
    import argparse as ap
    import types

    from fairseq.data import Dictionary

    from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel, taskmoe_small_architecture

    dictionary = Dictionary()
    for index in range(vocab):
        dictionary.add_symbol(f"w{index}")
    parser = ap.ArgumentParser(argument_default=ap.SUPPRESS)
    TaskMoeTransformerModel.add_args(parser)
    args = parser.parse_args([])
    args.encoder_moe_routing, args.decoder_moe_routing = routing
    args.moe_expert_count, args.moe_expert_parallel_size, args.dropout = experts, size, 0.0
    taskmoe_small_architecture(args)
    task = types.SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, langs=LANGS,
                                 provides_language_ids=True)
    torch.manual_seed(1)
    return TaskMoeTransformerModel.build_model(args, task), dictionary


class Counter:
    """Wraps ``dist.all_to_all_single``: bytes this rank sends to other ranks."""

    def __init__(self):
        self.sent = 0
        self.original = dist.all_to_all_single
        dist.all_to_all_single = self

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        rows = input.size(0)
        splits = input_split_sizes or [rows // size] * size
        row_bytes = input[0].numel() * input.element_size() if rows else 0
        self.sent += sum(split for peer, split in enumerate(splits) if peer != rank) * row_bytes
        return self.original(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)


def batch(dictionary, rank, sentences, source_len, target_len):
    generator = torch.Generator().manual_seed(10 + rank)
    low = dictionary.nspecial
    src = torch.randint(low, len(dictionary), (sentences, source_len), generator=generator)
    prev = torch.randint(low, len(dictionary), (sentences, target_len), generator=generator)
    prev[:, 0] = dictionary.eos()
    pairs = torch.randint(0, 6, (sentences,), generator=generator)  # en<->de,fr,ru
    other = 1 + pairs // 2
    src_lang = torch.where(pairs % 2 == 0, torch.zeros_like(other), other)
    tgt_lang = torch.where(pairs % 2 == 0, other, torch.zeros_like(other))
    return {"src_tokens": src, "src_lengths": torch.full((sentences,), source_len), "prev_output_tokens": prev,
            "src_lang_id": src_lang, "tgt_lang_id": tgt_lang}


def worker(rank, size, init_file, config, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    import taskmoe_fairseq  # noqa: F401  (registers the model)

    counter = Counter()
    for experts in config["experts"]:
        for routing in ROUTINGS:
            model, dictionary = build(experts, routing, size, config["vocab"])
            params = sum(p.numel() for p in model.parameters())
            expert_params = sum(p.numel() for p in model.parameters() if getattr(p, "expert", False))
            sample = batch(dictionary, rank, config["sentences"], config["source_len"], config["target_len"])
            model.train()
            counter.sent = 0
            logits, _ = model(**sample)
            forward = counter.sent
            logits.float().sum().backward()
            backward = counter.sent - forward
            model.eval()
            with torch.no_grad():
                encoder_out = model.encoder(sample["src_tokens"], sample["src_lengths"],
                                            src_lang_id=sample["src_lang_id"], tgt_lang_id=sample["tgt_lang_id"])
                counter.sent = 0
                model.decoder(sample["prev_output_tokens"][:, :1], encoder_out=encoder_out, incremental_state={})
                decode = counter.sent
            results.put({"rank": rank, "P": size, "E": experts, "routing": "/".join(routing), "params": params,
                         "expert_params": expert_params, "train_forward_bytes": forward,
                         "train_backward_bytes": backward, "decode_step_bytes": decode})
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/benchmarks/expert_parallel.json")
    parser.add_argument("--experts", default="8,32")
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--source-len", type=int, default=24)
    parser.add_argument("--target-len", type=int, default=24)
    options = parser.parse_args(argv)
    config = {"experts": [int(e) for e in options.experts.split(",")], "sizes": [int(p) for p in options.sizes.split(",")],
              "sentences": options.sentences, "source_len": options.source_len, "target_len": options.target_len,
              "vocab": 1000, "arch": "taskmoe_transformer_small", "embed_dim": 256, "ffn_dim": 1024, "top_k": 2,
              "capacity_factor": 1.25, "moe_layers_per_side": 1}
    record = Run("expert_parallel", __file__, argv, 1, config)
    rows = []
    for size in config["sizes"]:
        record.log(f"P = {size}: starting {size} ranks")
        results = mp.get_context("spawn").SimpleQueue()
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(worker, args=(size, os.path.join(folder, "rendezvous"), config, results), nprocs=size)
        while not results.empty():
            rows.append(results.get())
    record.record["results"] = {"per_rank": sorted(rows, key=lambda r: (r["E"], r["P"], r["routing"], r["rank"]))}
    record.write(options.out)


if __name__ == "__main__":
    main()
