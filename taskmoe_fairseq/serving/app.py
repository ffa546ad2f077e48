"""The HTTP API and the page, on aiohttp (``aiohttp.web``).

=======================  ==================================================================
``POST /translate``      ``{"lang_pair": "en-de", "texts": ["..."], "beam": 4, "max_len_b": 200}``
                         (``beam``, ``max_len_b`` optional) -> ``{"translations": ["..."]}``
``GET /pairs``           ``{"pairs": [...], "default_beam": 4, "max_beam": 8, "max_texts": 64, ...}``
``GET /health``          ``{"status": "ok", "expert_sets": {"loaded": [...], "max": N, ...}, "rss_mib": ...}``
``GET /``                a page: pick a pair, type text, see the translation
=======================  ==================================================================

Every error is JSON ``{"error": "<one line>"}`` with a 4xx status (unknown pair — the message
lists the served ones —, empty or too many texts, a text over the model's length, a bad
``beam``, malformed JSON, a body over ``max_body_bytes``: 413, an unknown path: 404) or 500 for a
failure of the server itself (logged); the server keeps serving. Handlers never run the model:
they check the request, hand it to the :class:`BatchingWorker` and await the result.
"""

import asyncio
import importlib.resources
import json
import logging

from aiohttp import web

from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.serving.batching import BatchingWorker, Job

logger = logging.getLogger(__name__)

FIELDS = ("lang_pair", "texts", "beam", "max_len_b")
SERVICE = web.AppKey("service", object)
WORKER = web.AppKey("worker", BatchingWorker)
SETTINGS = web.AppKey("settings", dict)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def rss_mib() -> float:
    """Resident memory of this process (``VmRSS``), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@web.middleware
async def json_errors(request, handler):
    """aiohttp's own errors (404, 405, 413...) as one-line JSON too."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS]["max_body_bytes"]
        return error_response(413, f"request body over {limit} bytes; send fewer or shorter texts per request")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        hint = "; the API is POST /translate, GET /pairs, GET /health, GET /" if error.status in (404, 405) else ""
        return error_response(error.status, f"{error.reason}: {request.method} {request.path}{hint}")


async def translate(request: web.Request) -> web.Response:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    raw = await request.read()  # over client_max_size: 413 (the middleware's message)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return error_response(400, f"malformed JSON body ({error}); send {{\"lang_pair\": \"en-de\", \"texts\": [\"...\"]}}")
    if not isinstance(body, dict):
        return error_response(400, 'the body must be a JSON object: {"lang_pair": "en-de", "texts": ["..."], "beam": 4}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        return error_response(400, f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    pair, texts = body.get("lang_pair"), body.get("texts")
    beam, max_len_b = body.get("beam", settings["default_beam"]), body.get("max_len_b", service.max_len_b)
    try:
        service.check(pair, texts, beam, max_len_b)
        job = Job(pair, texts, beam, max_len_b)
        translations = await asyncio.wrap_future(request.app[WORKER].submit(job))
    except TaskMoeError as error:
        return error_response(400, str(error))
    except Exception as error:  # noqa: BLE001  (the worker logged it; this request fails, the server goes on)
        return error_response(500, f"internal error ({type(error).__name__}: {error}); see the server's log")
    return web.json_response({"translations": translations})


async def pairs(request: web.Request) -> web.Response:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    return web.json_response({
        "pairs": service.pairs,
        "default_beam": settings["default_beam"],
        "max_beam": service.max_beam,
        "max_texts": service.max_texts,
        "max_len_b": service.max_len_b,
        "max_source_tokens": service.max_source_tokens,
    })


async def health(request: web.Request) -> web.Response:
    service, worker = request.app[SERVICE], request.app[WORKER]
    return web.json_response({
        "status": "ok",
        "pairs": len(service.pairs),
        "expert_sets": service.store.stats(),
        "worker": {"rounds": worker.rounds, "groups": worker.groups, "requests_done": worker.jobs_done},
        "rss_mib": round(rss_mib(), 1),
    })


async def page(request: web.Request) -> web.Response:
    html = importlib.resources.files("taskmoe_fairseq.serving").joinpath("page.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def build_app(service, worker: BatchingWorker, default_beam: int = 4, max_body_bytes: int = 1 << 20) -> web.Application:
    """The aiohttp application around a :class:`TranslationService` and its worker."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[json_errors])
    app[SERVICE], app[WORKER] = service, worker
    app[SETTINGS] = {"default_beam": default_beam, "max_body_bytes": max_body_bytes}
    app.router.add_post("/translate", translate)
    app.router.add_get("/pairs", pairs)
    app.router.add_get("/health", health)
    app.router.add_get("/", page)
    return app
