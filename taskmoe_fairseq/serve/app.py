"""The HTTP API and the page, on aiohttp (``aiohttp.web``).

=======================  ==================================================================
``POST /translate``      ``{"lang_pair": "en-de", "texts": ["..."], "beam": 4, "max_len_b": 200}``
                         (``beam``, ``max_len_b`` optional) -> ``{"translations": ["..."]}``
``GET /pairs``           ``{"pairs": [...], "default_beam": 4, "max_beam": 8, "max_texts": 64, ...}``
``GET /health``          ``{"status": "ok", "queue": {...}, "expert_sets": {...}, "worker": {...}, "rss_mib": ...}``
``GET /``                a page: pick a pair, type text, see the translation
=======================  ==================================================================

Answers are JSON in UTF-8 (``ensure_ascii=False``, ``charset=utf-8``). Every error is one line
``{"error": "..."}``: 4xx for the client's input (unknown pair, empty or too many texts, a text over
the model's length or not valid Unicode, a bad ``beam``, malformed or too deeply nested JSON: 400;
no or a wrong bearer token: 401; an unknown path: 404; a body over ``max_body_bytes``, or a request
bigger than the whole queue: 413; a body not sent as ``application/json``: 415, so that a web page
cannot make a browser post to the server without a CORS preflight), 503 with ``Retry-After`` when
the queue is full or the server is stopping, 504 when the request's deadline passed, and 500/503
with a line that names no server file when the server itself failed (the log has the detail).

Overload (see :class:`Limits`): a request holds one of ``max_requests`` places from its arrival
to its answer (taken before its body is read, so memory stays bounded by ``max_requests`` x
``max_body_bytes`` plus the model) and, once checked, ``beam`` x (source tokens + ``max_len_b``) of
``max_tokens`` per text; either full: 503. It has ``request_timeout`` seconds in all: then 504 and
its work is dropped, as when its client disconnects (aiohttp's ``handler_cancellation`` cancels
the handler): the :class:`BatchingWorker` skips a dropped job, or stops its group between
batches. Parsing and checking a body (JSON, SentencePiece, lengths) run on a thread pool, so the
event loop, and ``/health``, never wait for them; the model runs on the worker thread.
"""

import asyncio
import concurrent.futures
import dataclasses
import functools
import hmac
import importlib.resources
import json
import logging
import time
from typing import Optional

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from taskmoe_fairseq.errors import TaskMoeError, usage_error
from taskmoe_fairseq.serve.batching import Abandoned, BatchingWorker, Job, ServerStopping
from taskmoe_fairseq.serve.shared_weights import CheckpointChanged

logger = logging.getLogger(__name__)

FIELDS = ("lang_pair", "texts", "beam", "max_len_b")
OPEN_PATHS = ("/", "/health")  # need no token: the page (static) and the health check
RETRY_AFTER_SECONDS = 1


@dataclasses.dataclass
class Limits:
    """What the server takes on (the command's options of the same names).

    Attributes:
        max_requests: requests admitted at once, queued or decoding (``--max-queue-requests``).
        max_tokens: sum of the admitted requests' costs, ``beam`` x (source tokens + ``max_len_b``) per
            non-empty text (``--max-queue-tokens``).
        request_timeout: seconds from a request's arrival to its answer (``--request-timeout``; then 504).
        max_body_bytes: request body size limit (aiohttp's ``client_max_size``; 413 over it).
        default_beam: beam of a request that names none.
        auth_token: the bearer token every path but ``OPEN_PATHS`` needs (None: none needed).
    """

    max_requests: int = 32
    max_tokens: int = 1 << 20
    request_timeout: float = 60.0
    max_body_bytes: int = 1 << 20
    default_beam: int = 4
    auth_token: Optional[str] = None


class State:
    """What the handlers share, touched on the event loop only: the places and tokens in use, whether
    the server is stopping (a future set on shutdown), the preparation threads."""

    def __init__(self):
        self.requests = 0
        self.tokens = 0
        self.stopping: Optional[asyncio.Future] = None
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="taskmoe-serve-prepare")
        self.checkpoint_problem_logged = False


SERVICE = web.AppKey("service", object)
WORKER = web.AppKey("worker", BatchingWorker)
LIMITS = web.AppKey("limits", Limits)
STATE = web.AppKey("state", State)

dumps = functools.partial(json.dumps, ensure_ascii=False)


def json_response(body, status: int = 200, headers=None) -> web.Response:
    """``body`` as UTF-8 JSON (``Content-Type: application/json; charset=utf-8``); a string that cannot be
    UTF-8 (a lone surrogate) makes the whole body ASCII JSON with ``\\u`` escapes instead."""
    text = dumps(body)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(body)
    return web.json_response(text=text, status=status, headers=headers)


def error_response(status: int, message: str, headers=None) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)


def busy_response(message: str) -> web.Response:
    return error_response(503, message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def rss_mib() -> float:
    """Resident memory of this process (``VmRSS``), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@web.middleware
async def json_errors(request, handler):
    """aiohttp's own errors (404, 405, 413...) as one-line JSON too; any other exception is the
    server's: logged with its traceback, answered 500 with a line that says only that."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[LIMITS].max_body_bytes
        return error_response(413, f"request body over {limit} bytes; send fewer or shorter texts per request")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        hint = "; the API is POST /translate, GET /pairs, GET /health, GET /" if error.status in (404, 405) else ""
        return error_response(error.status, f"{error.reason}: {request.method} {request.path}{hint}")
    except Exception:  # noqa: BLE001  (a bug of ours, not the client's: logged, one line to the client)
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal server error; the server's log has the detail")


@web.middleware
async def bearer_auth(request, handler):
    """With a token configured, every path but ``OPEN_PATHS`` needs ``Authorization: Bearer TOKEN``
    (compared in constant time, ``hmac.compare_digest``); 401 otherwise."""
    token = request.app[LIMITS].auth_token
    if token is not None and request.path not in OPEN_PATHS:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        # the token is printable ASCII (cli.read_token); anything else, e.g. bytes that are not UTF-8, is wrong
        if scheme.lower() != "bearer" or not given.isascii() or not hmac.compare_digest(given.encode(), token.encode()):
            return error_response(401, "missing or wrong bearer token; send the header Authorization: Bearer <token>",
                                  headers={"WWW-Authenticate": 'Bearer realm="taskmoe"'})
    return await handler(request)


def _object_without_repeats(pairs):
    """A JSON object whose keys are all different (json keeps the last of a repeated key silently)."""
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise ValueError(f"the field {repeated!r:.60} appears more than once")
    return dict(pairs)


def prepare(service, limits: Limits, raw: bytes):
    """Parse and check a ``/translate`` body (on a preparation thread).

    Returns ``(lang_pair, texts, beam, max_len_b, cost)`` (cost: :meth:`TranslationService.check`'s).
    Raises:
        TaskMoeError: (one line, 400) malformed, too deeply nested or non-object JSON, an unknown field, a bad value.
    """
    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_repeats)
    except RecursionError:
        raise usage_error("malformed JSON body (nested too deeply); send "
                          '{"lang_pair": "en-de", "texts": ["..."]}') from None
    except (UnicodeDecodeError, ValueError) as error:
        reason = "a number with too many digits" if "int_max_str_digits" in str(error) else str(error)
        raise usage_error(f"malformed JSON body ({reason}); send {{\"lang_pair\": \"en-de\", \"texts\": [\"...\"]}}") from None
    if not isinstance(body, dict):
        raise usage_error('the body must be a JSON object: {"lang_pair": "en-de", "texts": ["..."], "beam": 4}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise usage_error(f"unknown field {unknown[0]!r:.60}; the fields are {', '.join(FIELDS)}")
    pair, texts = body.get("lang_pair"), body.get("texts")
    beam, max_len_b = body.get("beam", limits.default_beam), body.get("max_len_b", service.max_len_b)
    cost = service.check(pair, texts, beam, max_len_b)
    return pair, texts, beam, max_len_b, cost


class Ticket:
    """One admitted request: its place, its tokens and its job, all given back when its work ends."""

    def __init__(self, state: State, timeout: float):
        self.state, self.deadline = state, time.monotonic() + timeout
        self.cost, self.job = 0, None
        state.requests += 1

    def release(self, _task=None):
        self.state.requests -= 1
        self.state.tokens -= self.cost
        if self.job is not None and not self.job.future.done():
            self.job.abandon()  # its client left, its deadline passed or the server stops: the worker drops it


async def translate(request: web.Request) -> web.Response:
    state, limits = request.app[STATE], request.app[LIMITS]
    if request.content_type != "application/json":
        return error_response(415, f"the body must be sent as Content-Type: application/json (got {request.content_type!r})")
    if state.stopping.done():
        return busy_response("the server is shutting down; retry later")
    if state.requests >= limits.max_requests:
        return busy_response(f"the server is busy ({state.requests} requests queued, its limit); retry later")
    ticket = Ticket(state, limits.request_timeout)
    work = asyncio.ensure_future(_translate(request, ticket))
    work.add_done_callback(ticket.release)  # also when it is cancelled before it starts
    try:
        done, _ = await asyncio.wait((work, state.stopping), timeout=limits.request_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the client went away (handler_cancellation): drop its work
        work.cancel()
        raise
    if work in done:
        return work.result()
    work.cancel()
    if state.stopping.done():
        return busy_response("the server is shutting down; retry later")
    return error_response(504, f"no answer within {limits.request_timeout:g} s (the server's --request-timeout); "
                               "the request was dropped: retry later or send fewer texts")


async def _translate(request: web.Request, ticket: Ticket) -> web.Response:
    service, worker, state, limits = request.app[SERVICE], request.app[WORKER], request.app[STATE], request.app[LIMITS]
    try:
        raw = await request.read()  # over client_max_size: 413 (the middleware's message)
    except RequestPayloadError as error:  # a body its Content-Encoding cannot decode, or cut short: the client's
        return error_response(400, f"unreadable request body ({str(error)[:120]}); send plain or gzip-encoded JSON")
    loop = asyncio.get_running_loop()
    try:
        pair, texts, beam, max_len_b, cost = await loop.run_in_executor(state.prepare_pool, prepare, service, limits, raw)
    except TaskMoeError as error:
        return error_response(400, str(error))
    del raw
    if cost > limits.max_tokens:
        return error_response(413, f"the request needs {cost} queue tokens (beam x (source tokens + max_len_b) per text); "
                                   f"the server holds {limits.max_tokens} at most: send fewer texts, a smaller beam or max_len_b")
    if state.tokens + cost > limits.max_tokens:
        return busy_response(f"the server is busy ({state.tokens} of its {limits.max_tokens} queue tokens in use); retry later")
    state.tokens += cost
    ticket.cost = cost
    ticket.job = Job(pair, texts, beam, max_len_b, deadline=ticket.deadline, cost=cost)
    try:
        translations = await asyncio.wrap_future(worker.submit(ticket.job))
    except ServerStopping:
        return busy_response("the server is shutting down; retry later")
    except Abandoned:
        return error_response(504, "the request's deadline passed; retry later or send fewer texts")
    except CheckpointChanged:  # logged by the worker, with the file's name
        return error_response(503, "the server cannot load this pair: its checkpoint changed on disk since it started "
                                   "and it must be restarted")
    except Exception:  # noqa: BLE001  (logged by the worker; this request fails, the server goes on)
        return error_response(500, "the server failed to translate this request; its log has the detail")
    return json_response({"translations": translations})


async def pairs(request: web.Request) -> web.Response:
    service, limits = request.app[SERVICE], request.app[LIMITS]
    return json_response({
        "pairs": service.pairs,
        "default_beam": limits.default_beam,
        "max_beam": service.max_beam,
        "max_texts": service.max_texts,
        "max_len_b": service.max_len_b,
        "max_source_tokens": service.max_source_tokens,
        "max_queue_requests": limits.max_requests,
        "max_queue_tokens": limits.max_tokens,
        "request_timeout": limits.request_timeout,
    })


async def health(request: web.Request) -> web.Response:
    """200 ``"ok"``; 503 when the checkpoint changed on disk (its content, not its time) or the server stops."""
    service, worker, state, limits = request.app[SERVICE], request.app[WORKER], request.app[STATE], request.app[LIMITS]
    status = "ok"
    try:  # a stat, and a SHA-256 of the file once per new stamp: off the event loop
        await asyncio.get_running_loop().run_in_executor(None, service.weights.check_unchanged)
    except CheckpointChanged as error:
        if not state.checkpoint_problem_logged:
            logger.error("%s", error)
            state.checkpoint_problem_logged = True
        status = "the checkpoint changed on disk since the server started; restart the server"
    if state.stopping.done():
        status = "stopping"
    return json_response({
        "status": status,
        "pairs": len(service.pairs),
        "queue": {"requests": state.requests, "max_requests": limits.max_requests, "tokens": state.tokens,
                  "max_tokens": limits.max_tokens, "request_timeout": limits.request_timeout},
        "expert_sets": service.store.stats(),
        "worker": {"rounds": worker.rounds, "groups": worker.groups, "requests_done": worker.jobs_done,
                   "requests_dropped": worker.jobs_dropped},
        "rss_mib": round(rss_mib(), 1),
    }, status=200 if status == "ok" else 503)


async def page(request: web.Request) -> web.Response:
    html = importlib.resources.files("taskmoe_fairseq.serve").joinpath("page.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html", charset="utf-8")


async def _on_startup(app: web.Application):
    app[STATE].stopping = asyncio.get_running_loop().create_future()


async def _on_shutdown(app: web.Application):
    """Stop: the waiting handlers answer 503 at once, the worker refuses its queue and stops between batches."""
    if not app[STATE].stopping.done():
        app[STATE].stopping.set_result(None)
    app[WORKER].stop(timeout=0)


async def _on_cleanup(app: web.Application):
    app[STATE].prepare_pool.shutdown(wait=False, cancel_futures=True)


def build_app(service, worker: BatchingWorker, limits: Limits = None) -> web.Application:
    """The aiohttp application around a :class:`TranslationService` and its worker (run it with
    ``AppRunner(app, handler_cancellation=True)`` so that a client that leaves drops its work)."""
    limits = limits or Limits()
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[json_errors, bearer_auth])
    app[SERVICE], app[WORKER], app[LIMITS], app[STATE] = service, worker, limits, State()
    app.router.add_post("/translate", translate)
    app.router.add_get("/pairs", pairs)
    app.router.add_get("/health", health)
    app.router.add_get("/", page)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app
