"""Join an expert-parallel checkpoint into one ordinary checkpoint: ``python -m taskmoe_fairseq.consolidate``.

Reads ``<name>-shared.pt`` and ``<name>-rank-0.pt`` .. ``<name>-rank-{P-1}.pt``
(:mod:`taskmoe_fairseq.expert_parallel.sharded_checkpoint`) and writes one fairseq checkpoint
with every layer's experts stacked in global order and ``--moe-expert-parallel-size 1``,
for ``fairseq-generate``, ``fairseq-interactive``, the hub interface and
``python -m taskmoe_fairseq.extract``. The optimizer state is left out (as
fairseq's ``--no-save-optimizer-state``): its parameter order is per rank.

Example::

    python -m taskmoe_fairseq.consolidate --checkpoint-dir ckpt --output ckpt/full.pt
    python -m taskmoe_fairseq.consolidate --checkpoint-dir ckpt --name checkpoint_best --output best.pt
"""

import argparse
import os
import sys

from taskmoe_fairseq.expert_parallel import sharded_checkpoint
from taskmoe_fairseq.errors import run_cli, usage_error
from taskmoe_fairseq.files import check_replaceable


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m taskmoe_fairseq.consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint-dir", required=True, help="the --save-dir of the expert-parallel run")
    parser.add_argument("--name", default="checkpoint_last",
                        help="which checkpoint: the file name before -shared.pt (default checkpoint_last)")
    parser.add_argument("--output", required=True, help="the consolidated checkpoint to write")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return parser.parse_args(argv)


def run(options) -> str:
    stem = os.path.join(options.checkpoint_dir, options.name)
    if os.path.isdir(options.output):
        raise usage_error(f"--output {options.output} is a folder; pass a file name")
    check_replaceable(options.output, "--output")
    if os.path.exists(options.output) and not options.force:
        raise usage_error(f"{options.output} exists; pass --force to overwrite it")
    metas = sharded_checkpoint.check_set(stem)
    if os.path.realpath(options.output) in {os.path.realpath(path) for path in metas}:
        raise usage_error(f"--output {options.output} is one of the input files, which are never modified; choose another output")
    if os.path.isfile(options.output) and sharded_checkpoint.stem_of(options.output) is not None:
        # another set's -shared.pt or -rank-N.pt: a checkpoint consolidate did not write
        raise usage_error(f"--output {options.output} is a file of an expert-parallel checkpoint, which consolidate never "
                          "replaces, even with --force; choose another output")
    state = sharded_checkpoint.consolidate(stem)
    sharded_checkpoint.save(state, options.output)
    meta = metas[sharded_checkpoint.shared_path(stem)]
    print(
        f"taskmoe_fairseq.consolidate: {len(metas) - 1} shards of E = {meta['num_experts']} experts "
        f"({meta['num_updates']} updates) -> {options.output}",
        file=sys.stderr,
    )
    return options.output


def main(argv=None):
    return run_cli("taskmoe_fairseq.consolidate", lambda a: run(parse_args(a)) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
