"""``python -m taskmoe_fairseq.serve``: one process serves every language pair of a TaskMoE checkpoint.

Examples::

    python -m taskmoe_fairseq.serve --checkpoint ckpt/checkpoint_best.pt
    python -m taskmoe_fairseq.serve --checkpoint ckpt/checkpoint_best.pt --lang-pairs en-de,de-en \\
        --max-expert-sets 2 --host 127.0.0.1 --port 8080

It reads the checkpoint's shared weights once (:class:`SharedWeights`), loads each pair's experts
on first use and keeps at most ``--max-expert-sets`` expert sets (least recently used evicted),
and serves the API of :mod:`taskmoe_fairseq.serving.app` until SIGINT or SIGTERM. Once it
listens it prints one line, ``taskmoe_fairseq.serve: serving N pairs on http://HOST:PORT``
(``--port 0``: a free port, the line tells which). Bad options or checkpoints: one line
``taskmoe_fairseq.serve: error: ...`` and exit status 2.
"""

import argparse
import asyncio
import logging
import signal
import sys

from taskmoe_fairseq.errors import run_cli, usage_error

PROG = "taskmoe_fairseq.serve"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise usage_error(message)


def parse_args(argv=None):
    parser = _Parser(prog=f"python -m {PROG}", description="Serve every language pair of a TaskMoE checkpoint from "
                     "one process: shared weights once, each pair's experts loaded on demand.")
    parser.add_argument("--checkpoint", required=True, help="full TaskMoE checkpoint (an extracted one serves its own pair)")
    parser.add_argument("--lang-pairs", help="comma-separated pairs to serve (default: the checkpoint's training pairs)")
    parser.add_argument("--max-expert-sets", type=int, default=4,
                        help="expert sets kept loaded; the least recently used beyond are evicted (default 4)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    parser.add_argument("--data-dir", help="binarized data folder with the dictionaries (default: the checkpoint's own "
                        "folder when extract put them there, else the one recorded in the checkpoint)")
    parser.add_argument("--spm-model", help="SentencePiece model (default: DATA_DIR/spm.model)")
    parser.add_argument("--beam", type=int, default=4, help="beam of a request that gives none (default 4)")
    parser.add_argument("--max-beam", type=int, default=8, help="largest beam a request may ask (default 8)")
    parser.add_argument("--max-len-b", type=int, default=200,
                        help="at most N output tokens, tag and </s> counted (fairseq's --max-len-a 0 --max-len-b N; default 200)")
    parser.add_argument("--max-texts", type=int, default=64, help="texts per request at most (default 64)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size limit (default 1 MiB)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per forward (default 64)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    options = parser.parse_args(argv)
    for name in ("max_expert_sets", "beam", "max_beam", "max_len_b", "max_texts", "max_body_bytes", "batch_size"):
        if getattr(options, name) < 1:
            raise usage_error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(options, name)})")
    if options.beam > options.max_beam:
        raise usage_error(f"--beam {options.beam} is over --max-beam {options.max_beam}")
    if not 0 <= options.port <= 65535:
        raise usage_error(f"--port must be from 0 to 65535 (got {options.port})")
    if options.threads is not None and options.threads < 1:
        raise usage_error(f"--threads must be at least 1 (got {options.threads})")
    return options


def build_service(options):
    """The checkpoint's :class:`TranslationService` (raises TaskMoeError on bad input)."""
    from taskmoe_fairseq.serving.service import TranslationService
    from taskmoe_fairseq.serving.shared_weights import SharedWeights

    weights = SharedWeights(options.checkpoint, data_dir=options.data_dir, spm_model=options.spm_model)
    pairs = [pair.strip() for pair in options.lang_pairs.split(",") if pair.strip()] if options.lang_pairs else None
    return TranslationService(weights, pairs, max_expert_sets=options.max_expert_sets, max_len_b=options.max_len_b,
                              max_beam=options.max_beam, max_texts=options.max_texts, batch_size=options.batch_size)


async def serve(app, host: str, port: int, pairs: int):
    """Listen until SIGINT/SIGTERM; print the address once listening."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise usage_error(f"cannot listen on {host}:{port} ({error.strerror or error}); pass another --port") from None
    bound = runner.addresses[0][1] if runner.addresses else port  # the port bound (--port 0: a free one)
    print(f"{PROG}: serving {pairs} pairs on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for name in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(name, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise usage_error("aiohttp is not installed: pip install 'taskmoe-fairseq[serve]'") from None
    import torch

    from taskmoe_fairseq.serving.app import build_app
    from taskmoe_fairseq.serving.batching import BatchingWorker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if options.threads:
        torch.set_num_threads(options.threads)
    service = build_service(options)
    worker = BatchingWorker(service.translate, max_group_texts=max(options.batch_size, options.max_texts))
    app = build_app(service, worker, default_beam=options.beam, max_body_bytes=options.max_body_bytes)
    try:
        asyncio.run(serve(app, options.host, options.port, len(service.pairs)))
    finally:
        worker.stop()
    return 0


def cli(argv=None) -> int:
    """The command's entry point: ``main`` with one-line errors (exit status 2)."""
    return run_cli(PROG, main, argv)
