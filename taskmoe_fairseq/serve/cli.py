"""``python -m taskmoe_fairseq.serve``: one process serves every language pair of a TaskMoE checkpoint.

Examples::

    python -m taskmoe_fairseq.serve --checkpoint ckpt/checkpoint_best.pt
    python -m taskmoe_fairseq.serve --checkpoint ckpt/checkpoint_best.pt --lang-pairs en-de,de-en \\
        --max-expert-sets 2 --host 127.0.0.1 --port 8080
    python -m taskmoe_fairseq.serve --checkpoint ckpt/checkpoint_best.pt --host 0.0.0.0 --auth-token-file token.txt

It reads the checkpoint's shared weights once (:class:`SharedWeights`), loads each pair's experts
on first use and keeps at most ``--max-expert-sets`` expert sets (least recently used evicted),
and serves the API of :mod:`taskmoe_fairseq.serve.app` until SIGINT or SIGTERM. Once it
listens it prints one line, ``taskmoe_fairseq.serve: serving N pairs on http://HOST:PORT``
(``--port 0``: a free port, the line tells which). Bad options or checkpoints: one line
``taskmoe_fairseq.serve: error: ...`` and exit status 2; so is a ``--host`` that is not a loopback
address without ``--auth-token-file`` (or ``--insecure``). On SIGINT/SIGTERM it stops listening,
answers every waiting request 503 at once, gives connections ``SHUTDOWN_SECONDS`` to close and the
worker thread ``WORKER_STOP_SECONDS`` to end (it stops between two fairseq batches); a batch still
being decoded then (nobody waits for it) ends with the process (``os._exit``, after flushing).
"""

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import sys

from taskmoe_fairseq.devices import add_device_args, resolve_device
from taskmoe_fairseq.errors import run_cli, usage_error

PROG = "taskmoe_fairseq.serve"
SHUTDOWN_SECONDS = 3.0  # aiohttp's shutdown_timeout
WORKER_STOP_SECONDS = 1.0


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
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; another than loopback needs --auth-token-file or --insecure)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    parser.add_argument("--data-dir", help="binarized data folder with the dictionaries (default: the checkpoint's own "
                        "folder when extract put them there, else the one recorded in the checkpoint)")
    parser.add_argument("--spm-model", help="SentencePiece model (default: DATA_DIR/spm.model)")
    add_device_args(parser)  # --device {auto,cpu,cuda}, --device-index N (taskmoe_fairseq.devices)
    parser.add_argument("--beam", type=int, default=4, help="beam of a request that gives none (default 4)")
    parser.add_argument("--max-beam", type=int, default=8, help="largest beam a request may ask (default 8)")
    parser.add_argument("--max-len-b", type=int, default=200,
                        help="at most N output tokens, tag and </s> counted (fairseq's --max-len-a 0 --max-len-b N; default 200)")
    parser.add_argument("--max-texts", type=int, default=64, help="texts per request at most (default 64)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size limit (default 1 MiB)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per forward (default 64)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--max-queue-requests", type=int, default=32,
                        help="requests taken at once, waiting or decoding; more are answered 503 (default 32)")
    parser.add_argument("--max-queue-tokens", type=int, default=1 << 20,
                        help="sum over the requests taken of beam x (source tokens + max_len_b) per text; "
                             "more: 503 (default 1048576)")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="seconds a request may take from arrival to answer; then 504 and its work is dropped (default 60)")
    parser.add_argument("--auth-token-file", help="file holding a bearer token every request but GET / and GET /health "
                                                  "must send (Authorization: Bearer TOKEN)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without --auth-token-file (anyone who reaches it may use it)")
    options = parser.parse_args(argv)
    for name in ("max_expert_sets", "beam", "max_beam", "max_len_b", "max_texts", "max_body_bytes", "batch_size",
                 "max_queue_requests", "max_queue_tokens"):
        if getattr(options, name) < 1:
            raise usage_error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(options, name)})")
    if not (math.isfinite(options.request_timeout) and options.request_timeout > 0):
        raise usage_error(f"--request-timeout must be a number of seconds above 0 (got {options.request_timeout:g})")
    options.auth_token = read_token(options.auth_token_file) if options.auth_token_file else None
    if options.auth_token is None and not options.insecure and not is_loopback(options.host):
        raise usage_error(f"--host {options.host} is reachable from other machines and nothing guards it: pass "
                          "--auth-token-file FILE (a bearer token), or --insecure to serve anyone who reaches it")
    if options.beam > options.max_beam:
        raise usage_error(f"--beam {options.beam} is over --max-beam {options.max_beam}")
    if not 0 <= options.port <= 65535:
        raise usage_error(f"--port must be from 0 to 65535 (got {options.port})")
    if options.threads is not None and options.threads < 1:
        raise usage_error(f"--threads must be at least 1 (got {options.threads})")
    return options


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped).

    Raises:
        TaskMoeError: unreadable, empty, or not printable ASCII without spaces (an HTTP header value).
    """
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe would block the read forever
        raise usage_error(f"--auth-token-file {path} is not a regular file; write the token in a file")
    try:
        with open(path, encoding="utf-8") as stream:
            token = stream.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise usage_error(f"--auth-token-file {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if not token:
        raise usage_error(f"--auth-token-file {path} is empty; write a token in it (e.g. python -c "
                          "'import secrets; print(secrets.token_urlsafe(32))' > FILE)")
    if not all("!" <= char <= "~" for char in token):
        raise usage_error(f"--auth-token-file {path}: the token must be printable ASCII without spaces")
    return token


def build_service(options):
    """The checkpoint's :class:`TranslationService` (raises TaskMoeError on bad input)."""
    from taskmoe_fairseq.serve.service import TranslationService
    from taskmoe_fairseq.serve.shared_weights import SharedWeights

    device = resolve_device(options.device, options.device_index)
    weights = SharedWeights(options.checkpoint, data_dir=options.data_dir, spm_model=options.spm_model, device=device)
    pairs = [pair.strip() for pair in options.lang_pairs.split(",") if pair.strip()] if options.lang_pairs else None
    if options.lang_pairs is not None and not pairs:
        raise usage_error(f"--lang-pairs {options.lang_pairs!r} names no pair; give e.g. --lang-pairs en-de,de-en, or leave it out")
    return TranslationService(weights, pairs, max_expert_sets=options.max_expert_sets, max_len_b=options.max_len_b,
                              max_beam=options.max_beam, max_texts=options.max_texts, batch_size=options.batch_size)


async def serve(app, host: str, port: int, pairs: int):
    """Listen until SIGINT/SIGTERM; print the address once listening."""
    from aiohttp import web

    # handler_cancellation: a client that disconnects cancels its handler, which drops its work
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS)
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

    from taskmoe_fairseq.serve.app import Limits, build_app
    from taskmoe_fairseq.serve.batching import BatchingWorker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if options.threads:
        torch.set_num_threads(options.threads)
    service = build_service(options)
    worker = BatchingWorker(service.translate, max_group_texts=max(options.batch_size, options.max_texts))
    limits = Limits(max_requests=options.max_queue_requests, max_tokens=options.max_queue_tokens,
                    request_timeout=options.request_timeout, max_body_bytes=options.max_body_bytes,
                    default_beam=options.beam, auth_token=options.auth_token)
    app = build_app(service, worker, limits)
    try:
        asyncio.run(serve(app, options.host, options.port, len(service.pairs)))
    finally:
        stopped = worker.stop(timeout=WORKER_STOP_SECONDS)
    if not stopped:  # a batch nobody waits for is still decoding: end now (a normal exit would wait or abort in torch)
        logging.getLogger(__name__).warning("stopped while a batch was being decoded (its requests were answered 503)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cli(argv=None) -> int:
    """The command's entry point: ``main`` with one-line errors (exit status 2)."""
    return run_cli(PROG, main, argv)
