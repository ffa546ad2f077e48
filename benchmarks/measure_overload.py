"""Does the server hold under overload? Ten times its capacity for 30 s, clients that give up at random.

    PYTHONPATH=. python benchmarks/measure_overload.py --checkpoint CKPT --out docs/benchmarks/overload.json

It starts ``python -m taskmoe_fairseq.serve`` on a loopback port with a bearer token and small,
explicit limits (``--max-queue-requests`` places, ``--request-timeout``), translates each request
of a fixed pool once, sequentially (its reference answer), then runs ``--clients-factor`` x
``--max-queue-requests`` clients (the capacity: what the server takes at once) for ``--duration``
seconds, each sending requests of the pool back to back (light ones, 1 text at beam 1, and heavy
ones, ``--max-texts`` texts at beam 8 and ``max_len_b`` 200, as in issue 28), after a 503 waiting a
random part of its ``Retry-After``; a ``--disconnect-rate`` share of them is abandoned by its client
if not answered after a random wait (up to ``--abandon-after`` s; the connection is closed). A
sampler asks ``GET /health`` every ``--health-interval`` s (latency, ``rss_mib``, the queue). At the end the clients stop, SIGTERM goes to the server while requests are still in
flight, and the time to its exit is taken.

Checked and recorded (nothing is asserted on the machine's speed): every answer is 200, 503
(``Retry-After``) or 504, and each 200 equals its sequential answer; the /health latencies (p50,
p99, max); the peak resident memory against the bound the limits give: resident memory after the
warm-up (each request once, ``--max-queue-requests`` copies of the heaviest at once: the largest
batch the worker decodes, then ``--warm-up`` seconds of the same load: the connections', threads'
and allocator's working set; its peak: RSS swings by tens of MiB with the batches decoded, so the
warm-up is as long as the run) + ``max_queue_requests`` x ``max_body_bytes`` x ``BODY_FACTOR`` (a
taken request holds at most its body, its decoded text and its parsed JSON), i.e. memory does not
grow with the number of requests sent, only with what the limits let in; SIGTERM to exit. Loopback
only; it stops by itself (``--duration``, ``--max-sent``). ``tests/test_serve.py`` runs :func:`overload` against its
own server with a few dozen requests and asserts the same properties.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY_FACTOR = 8  # bytes of memory a taken request may hold per body byte (raw body, str at up to 4 bytes a character, JSON)
SENTENCES = [
    "Click the button to open the dialog.",
    "The file could not be saved because the disk is full.",
    "Select the cells that you want to format.",
    "Do you want to keep the current format?",
    "The document contains macros that are disabled.",
    "Enter the name of the new style.",
    "Insert a table with three columns and five rows.",
    "The selected range is not valid.",
]


def request_pool(pairs, max_texts: int):
    """The requests the clients send: per pair, light (1 text, beam 1) and heavy (``max_texts`` texts, beam 8, 200)."""
    pool = []
    for number, pair in enumerate(pairs):
        pool.append({"lang_pair": pair, "texts": [SENTENCES[number % len(SENTENCES)]], "beam": 1, "max_len_b": 30})
        pool.append({"lang_pair": pair, "texts": [SENTENCES[(number + i) % len(SENTENCES)] for i in range(4)],
                     "beam": 4, "max_len_b": 60})
        pool.append({"lang_pair": pair, "texts": [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(max_texts)],
                     "beam": 8, "max_len_b": 200})
    return pool


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


async def sequential_answers(url: str, headers: dict, pool) -> list:
    """Each request of ``pool`` translated alone, one after the other (the reference answers)."""
    import aiohttp

    answers = []
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for body in pool:
            async with session.post(url + "/translate", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"sequential request failed: {response.status} {answer}")
                answers.append(answer["translations"])
    return answers


async def burst(url: str, headers: dict, body: dict, copies: int) -> list:
    """``copies`` concurrent copies of one request (the warm-up's worst case: a full queue of the heaviest
    request, decoded together); their statuses."""
    import aiohttp

    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one():
            async with session.post(url + "/translate", json=body) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one() for _ in range(copies)))


async def overload(url: str, headers: dict, pool, clients: int, duration: float, max_sent: int, disconnect_rate: float,
                   seed: int = 0, health_interval: float = 0.2, on_stop=None, abandon_after: float = 2.0) -> dict:
    """``clients`` clients send requests of ``pool`` back to back for ``duration`` s or ``max_sent`` requests;
    a ``disconnect_rate`` share is abandoned (connection closed) if not answered after a random wait of up to
    ``abandon_after`` s.

    Returns ``{"requests": [{"index", "status" (None: abandoned by its client), "translations", "retry_after",
    "seconds"}...], "health": [{"seconds", "status", "rss_mib", "queue"}...]}``. ``on_stop()`` (e.g. SIGTERM to
    the server) is called when the clients stop taking new requests, with requests still in flight.
    """
    import aiohttp

    stop = asyncio.Event()
    records, health = [], []
    sent = 0

    async def one(session, index):
        start = time.perf_counter()
        record = {"index": index, "status": None, "translations": None, "retry_after": None}
        try:
            async with session.post(url + "/translate", json=pool[index]) as response:
                body = await response.json()
                record.update(status=response.status, retry_after=response.headers.get("Retry-After"),
                              translations=body.get("translations"), error=body.get("error"))
        except aiohttp.ClientConnectionError as error:  # the server went away (after SIGTERM)
            record.update(status="connection error", error=repr(error))
        record["seconds"] = time.perf_counter() - start
        return record

    async def client(number):
        nonlocal sent
        client_rng = random.Random(seed * 1000 + number)
        # one connection per request, closed at its end or when its client gives up
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=600)) as session:
            while not stop.is_set() and sent < max_sent:
                sent += 1
                index = client_rng.randrange(len(pool))
                task = asyncio.ensure_future(one(session, index))
                if client_rng.random() < disconnect_rate:
                    done, _ = await asyncio.wait({task}, timeout=client_rng.uniform(0, abandon_after))
                    if not done:
                        task.cancel()  # the client gives up: its connection is closed
                        records.append({"index": index, "status": None, "translations": None, "abandoned": True})
                        continue
                record = await task
                records.append(record)
                if record["status"] == 503 and record.get("retry_after"):  # a polite client waits up to Retry-After
                    await asyncio.sleep(client_rng.uniform(0, float(record["retry_after"])))

    async def sampler():
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
            while not stop.is_set():
                start = time.perf_counter()
                async with session.get(url + "/health") as response:
                    body = await response.json()
                health.append({"seconds": time.perf_counter() - start, "status": response.status,
                               "rss_mib": body["rss_mib"], "queue": body["queue"]})
                await asyncio.sleep(health_interval)

    tasks = [asyncio.ensure_future(client(number)) for number in range(clients)]
    sampling = asyncio.ensure_future(sampler())
    started = time.perf_counter()
    while time.perf_counter() - started < duration and sent < max_sent:
        await asyncio.sleep(0.05)
    stop.set()
    await sampling
    if on_stop is not None:
        on_stop()
    await asyncio.gather(*tasks)
    return {"requests": records, "health": health, "load_seconds": time.perf_counter() - started}


def check(result: dict, answers: list, rss_bound_mib: float, stopped: bool = False) -> dict:
    """The properties (a dict of counts and flags; ``ok`` is their conjunction). ``stopped``: the server got
    SIGTERM while requests were in flight (503 then, or a connection the stopped server closed)."""
    answered = [r for r in result["requests"] if r["status"] is not None]
    statuses = {}
    for record in answered:
        statuses[str(record["status"])] = statuses.get(str(record["status"]), 0) + 1
    allowed = {200, 503, 504} | ({"connection error"} if stopped else set())
    wrong = [r for r in answered if r["status"] == 200 and r["translations"] != answers[r["index"]]]
    latencies = [h["seconds"] for h in result["health"]]
    peak = max((h["rss_mib"] for h in result["health"]), default=float("nan"))
    out = {
        "sent": len(result["requests"]),
        "abandoned_by_client": len(result["requests"]) - len(answered),
        "statuses": statuses,
        "unexpected_statuses": sorted({str(r["status"]) for r in answered if r["status"] not in allowed}),
        "503_without_retry_after": sum(1 for r in answered if r["status"] == 503 and not r.get("retry_after")),
        "200_different_from_sequential": len(wrong),
        "health_samples": len(latencies),
        "health_p50_s": round(percentile(latencies, 50), 4),
        "health_p99_s": round(percentile(latencies, 99), 4),
        "health_max_s": round(max(latencies, default=float("nan")), 4),
        "health_not_200": sum(1 for h in result["health"] if h["status"] != 200),
        "peak_queue_requests": max((h["queue"]["requests"] for h in result["health"]), default=0),
        "rss_peak_mib": peak,
        "rss_peak_first_half_mib": max((h["rss_mib"] for h in result["health"][:len(latencies) // 2]), default=float("nan")),
        "rss_peak_second_half_mib": max((h["rss_mib"] for h in result["health"][len(latencies) // 2:]), default=float("nan")),
        "rss_bound_mib": round(rss_bound_mib, 1) if math.isfinite(rss_bound_mib) else None,
    }
    out["ok"] = (not out["unexpected_statuses"] and not out["503_without_retry_after"] and not wrong
                 and statuses.get("200", 0) > 0 and not out["health_not_200"] and peak <= rss_bound_mib)
    return out


def start_server(checkpoint: str, options, token_file: str, log):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "taskmoe_fairseq.serve", "--checkpoint", checkpoint, "--port", "0",
               "--auth-token-file", token_file, *options]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    first = {}
    reader = threading.Thread(target=lambda: first.setdefault("line", process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(600)
    match = re.search(r"serving \d+ pairs on (http://\S+)", first.get("line", ""))
    if match is None:
        process.kill()
        raise SystemExit(f"the server did not start: {first.get('line')!r} (log: {log.name})")
    return process, match.group(1)


def machine() -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                    .splitlines() if line.startswith("Model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--lang-pairs", default="en-de,en-ru", help="pairs the clients ask for (default en-de,en-ru)")
    parser.add_argument("--max-queue-requests", type=int, default=4)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--max-texts", type=int, default=64)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients-factor", type=int, default=10, help="clients = this x --max-queue-requests (default 10)")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warm-up", type=float, default=30.0,
                        help="seconds of the same load before the measured run (default 30: RSS swings by tens of MiB "
                             "with the batches decoded, a shorter warm-up may not see its top)")
    parser.add_argument("--max-sent", type=int, default=20000, help="stop after this many requests at most")
    parser.add_argument("--disconnect-rate", type=float, default=0.3)
    parser.add_argument("--abandon-after", type=float, default=2.0, help="an abandoning client waits up to this (s)")
    parser.add_argument("--health-interval", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON record")
    options = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="taskmoe-overload-")
    token = os.urandom(16).hex()
    token_file = os.path.join(folder, "token")
    with open(token_file, "w") as stream:
        stream.write(token + "\n")
    server_options = ["--max-queue-requests", str(options.max_queue_requests), "--request-timeout", str(options.request_timeout),
                      "--max-texts", str(options.max_texts), "--max-body-bytes", str(options.max_body_bytes),
                      "--threads", str(options.threads), "--lang-pairs", options.lang_pairs]
    record = {"command": " ".join(["python", "benchmarks/measure_overload.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(), "server_options": server_options, "options": vars(options)}
    headers = {"Authorization": f"Bearer {token}"}
    pool = request_pool(options.lang_pairs.split(","), options.max_texts)
    with open(os.path.join(folder, "server.log"), "w+") as log:
        process, url = start_server(options.checkpoint, server_options, token_file, log)
        try:
            answers = asyncio.run(sequential_answers(url, headers, pool))  # also the warm-up: every pair loaded
            warm_statuses = asyncio.run(burst(url, headers, pool[-1], options.max_queue_requests))
            warm_up = asyncio.run(overload(url, headers, pool, options.clients_factor * options.max_queue_requests,
                                           options.warm_up, options.max_sent, options.disconnect_rate, options.seed + 1,
                                           options.health_interval, abandon_after=options.abandon_after))
            rss_warm = max([_health(url, headers)["rss_mib"]] + [h["rss_mib"] for h in warm_up["health"]])  # its peak
            bound = rss_warm + options.max_queue_requests * options.max_body_bytes * BODY_FACTOR / 2 ** 20
            stopped_at = {}

            def sigterm():
                stopped_at["t"] = time.perf_counter()
                process.send_signal(signal.SIGTERM)

            result = asyncio.run(overload(url, headers, pool, options.clients_factor * options.max_queue_requests,
                                          options.duration, options.max_sent, options.disconnect_rate, options.seed,
                                          options.health_interval, on_stop=sigterm, abandon_after=options.abandon_after))
            code = process.wait(120)
            exit_seconds = time.perf_counter() - stopped_at["t"]
        finally:
            if process.poll() is None:
                process.kill()
        log.seek(0)
        server_log = log.read()
    summary = check(result, answers, bound, stopped=True)
    summary.update(rss_warm_mib=rss_warm, warm_up_burst_statuses=warm_statuses, warm_up=check(warm_up, answers, float("inf")),
                   sigterm_exit_code=code, sigterm_to_exit_s=round(exit_seconds, 2),
                   load_seconds=round(result["load_seconds"], 1), clients=options.clients_factor * options.max_queue_requests,
                   tracebacks_in_log=server_log.count("Traceback"))
    summary["ok"] = summary["ok"] and summary["warm_up"]["ok"] and code == 0 and exit_seconds < 10 and summary["health_p99_s"] < 1
    record["summary"] = summary
    record["pool"] = [{"lang_pair": r["lang_pair"], "texts": len(r["texts"]), "beam": r["beam"], "max_len_b": r["max_len_b"]}
                      for r in pool]
    record["health"] = result["health"]
    record["requests"] = [{k: r.get(k) for k in ("index", "status", "seconds")} for r in result["requests"]]
    os.makedirs(os.path.dirname(os.path.abspath(options.out)), exist_ok=True)
    with open(options.out, "w") as stream:
        json.dump(record, stream, indent=1)
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


def _health(url: str, headers: dict) -> dict:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=headers), timeout=60) as response:
        return json.loads(response.read())


if __name__ == "__main__":
    sys.exit(main())
