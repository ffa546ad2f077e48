"""python -m taskmoe_fairseq.serve: one process serves every pair of a full checkpoint.

In-process (token/target, 12 updates: the token-routed encoder stays whole): each pair's model
is the model's own extraction, shares every non-expert tensor with the others, and the store
evicts and frees expert sets; the batching worker drops jobs nobody waits for (a stand-in
translate, no timing). Over loopback, against one real server (the 300-update
target/target model of test_translate/test_export, which gives varied outputs; 6 pairs, 4 expert
sets: de-en, fr-en and ru-en share the target-English one): every pair's translations equal its
extracted checkpoint's (in-process, and one pair through the real fairseq-generate), bad input
is a 4xx JSON line while the server keeps serving, 2,000 concurrent small requests mixing all
pairs give no error, the right answer each and no resident-memory growth, and the page works in
headless Chromium. Against a second, guarded server (issue 28: 2 places, a token budget, a 10 s
deadline, a bearer token, its own copy of the checkpoint): client input is never a 500 and answers
are UTF-8; only JSON with the token is taken; a full queue is a 503 with Retry-After; a request
past its deadline is a 504; a client that leaves frees its place and its work is dropped; /health
answers while a huge text is checked; a bounded overload keeps every answer right; a touched
checkpoint is no change and a changed one is the server's 503. SIGTERM with requests in flight
answers them and exits 0.
"""

import asyncio
import concurrent.futures
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref

import pytest
import sentencepiece
import torch

from cli_helpers import ENV, LANG_PAIRS, NO_LOADER_WORKERS, REPO, TASK_ARGS, TEST_LINES, raw_lines, run_in_process
from taskmoe_fairseq import extract, translate
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.serve import cli as serve_cli
from taskmoe_fairseq.serve.service import TranslationService
from taskmoe_fairseq.serve.shared_weights import SharedWeights

MAX_LEN = 30
BEAM = 4
UPDATES = 300  # the target/target model test_translate.py and test_export.py train
LOAD_REQUESTS, WARM_UP, CONCURRENCY = 2000, 300, 64  # 64 in flight: requests wait together and are batched (about 10 per pair)
RSS_TOLERANCE_MIB = 24  # a per-request leak of 12 KiB over the 1,700 measured requests would exceed it
sys.path.insert(0, os.path.join(REPO, "examples"))


# ---------------------------------------------------------------- in-process: assembly and the store


@pytest.fixture(scope="module")
def token_target(trained):
    checkpoint = trained.get("token", "target")
    weights = SharedWeights(checkpoint)
    full = translate.load_fairseq(checkpoint, "en-de").hub.models[0]
    return checkpoint, weights, full


def test_pair_models_are_the_extraction_and_share_the_rest(token_target):
    _, weights, full = token_target
    assert weights.layers == [("decoder", 1, "target")]
    assert not any(key.startswith("decoder.layers.1.moe.") for key in weights.shared)  # experts are not held
    assert weights.shared["encoder.layers.1.moe.experts.fc1_weight"].size(0) == 4  # the token-routed layer is, whole
    service = TranslationService(weights, max_expert_sets=6)
    models = {}
    for pair in LANG_PAIRS:
        service.store.translator(pair)
        models[pair] = service.store._sets[service.store.key_of(pair)].model
    assert len(service.store._sets) == 4  # de-en, fr-en, ru-en: one target-English expert set
    assert models["de-en"] is models["fr-en"] is models["ru-en"]
    for pair in ("en-de", "de-en"):
        want = full.extract(pair)[0].state_dict()
        got = models[pair].state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[key], want[key]) for key in want), pair
    a, b = dict(models["en-de"].named_parameters()), dict(models["en-fr"].named_parameters())
    experts = [key for key in a if key.startswith("decoder.layers.1.moe.")]
    shared = [key for key in a if key not in experts]
    assert experts and all(a[key] is b[key] is weights.shared[key] for key in shared)  # same Parameter objects
    assert not any(a[key].data_ptr() == b[key].data_ptr() for key in experts)
    weights_a, weights_b = (models[pair].state_dict()["decoder.layers.1.moe.expert_weights"] for pair in ("en-de", "en-fr"))
    assert not torch.equal(weights_a, weights_b)


def test_least_recently_used_expert_set_is_evicted_and_freed(token_target, data_dir):
    _, weights, _ = token_target
    service = TranslationService(weights, max_expert_sets=1)
    lines = raw_lines(data_dir, "en-de")[:4]
    first = service.translate("en-de", lines, 1, MAX_LEN)
    model = weakref.ref(service.store._sets[service.store.key_of("en-de")].model)
    service.translate("de-en", lines, 1, MAX_LEN)
    gc.collect()
    assert model() is None  # evicted: its experts are gone
    assert service.translate("en-de", lines, 1, MAX_LEN) == first  # loaded again from the checkpoint
    stats = service.store.stats()
    assert (stats["loads"], stats["evictions"], len(stats["loaded"])) == (3, 2, 1)
    assert stats["loaded"][0]["pairs"] == ["en-de"]


def test_the_worker_drops_unwanted_jobs_before_and_between_batches():
    """BatchingWorker with a stand-in translate (two "batches", ``on_batch`` between them, each waiting for the
    test): a job abandoned or past its deadline is never decoded; a group abandoned while decoding stops after
    the batch it is in; stop() refuses the queue."""
    from taskmoe_fairseq.serve.batching import Abandoned, BatchingWorker, Job, ServerStopping

    entered, proceed, batches = threading.Semaphore(0), threading.Semaphore(0), []

    def translate(pair, texts, beam, max_len_b, on_batch):
        for half in (texts[:1], texts[1:]):
            if half:
                entered.release()
                assert proceed.acquire(timeout=60)
                batches.append(list(half))
                on_batch(len(half))
        return [text.upper() for text in texts]

    worker = BatchingWorker(translate, max_group_texts=8)
    first = worker.submit(Job("en-de", ["a"], 1, 10))
    assert entered.acquire(timeout=60)  # the worker decodes "a"; the jobs below wait in its queue
    left, late = Job("en-de", ["b"], 2, 10), Job("en-de", ["c"], 3, 10, deadline=time.monotonic() - 1)
    leaving = Job("en-de", ["d", "e"], 4, 10)
    for job in (left, late, leaving):
        worker.submit(job)
    left.abandon()
    proceed.release()
    assert first.result(60) == ["A"]
    assert entered.acquire(timeout=60)  # "d", first batch: the next job decoded is leaving's ("b" and "c" skipped)
    leaving.abandon()  # its client leaves during the first batch
    proceed.release()
    with pytest.raises(Abandoned):
        leaving.future.result(60)
    assert batches == [["a"], ["d"]]  # "e" never decoded
    assert (worker.jobs_done, worker.jobs_dropped) == (1, 3)
    running = worker.submit(Job("en-de", ["f", "g"], 1, 10))
    assert entered.acquire(timeout=60)  # "f" is being decoded
    queued = worker.submit(Job("en-de", ["h"], 2, 10))
    worker.stop(timeout=0)  # the queue is refused at once, the running group stops after its batch
    with pytest.raises(ServerStopping):
        queued.result(60)
    proceed.release()
    with pytest.raises(ServerStopping):
        running.result(60)
    assert worker.stop(timeout=60)  # the thread ended
    assert batches == [["a"], ["d"], ["f"]]


# ---------------------------------------------------------------- over loopback: one real server


class Server:
    def __init__(self, process, url, token=None):
        self.process, self.url, self.token = process, url, token

    def headers(self, content_type="application/json"):
        headers = {"Content-Type": content_type} if content_type else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def raw_request(self, path, data=None, headers=None):
        """``(status, headers, body bytes)`` of ``GET path`` (``data`` None) or ``POST path``."""
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers() if headers is None else headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def request(self, path, body=None, raw=None):
        """``(status, JSON body)`` of ``GET path`` or ``POST path`` with ``body`` (JSON) / ``raw`` bytes."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        status, _, answer = self.raw_request(path, data)
        return status, json.loads(answer)

    def translate(self, pair, texts, beam=BEAM, max_len_b=MAX_LEN):
        status, body = self.request("/translate", {"lang_pair": pair, "texts": texts, "beam": beam, "max_len_b": max_len_b})
        assert status == 200, body
        return body["translations"]

    def health(self):
        return self.request("/health")[1]

    def wait_for(self, condition, what):
        """Poll ``GET /health`` until ``condition(health)`` (a wait for the server's state, not a time bound)."""
        for _ in range(6000):
            health = self.health()
            if condition(health):
                return health
            threading.Event().wait(0.01)
        raise AssertionError(f"the server never reached: {what} ({health})")

    def rss_mib(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def start_server(checkpoint, *options, token=None):
    """The real server (``python -m taskmoe_fairseq.serve``) on a free loopback port."""
    command = [sys.executable, "-m", "taskmoe_fairseq.serve", "--checkpoint", checkpoint, "--port", "0", "--threads", "1",
               *options]
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # the server's log (a pipe could fill and block it)
    process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    first = {}
    reader = threading.Thread(target=lambda: first.setdefault("line", process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    match = re.fullmatch(r"taskmoe_fairseq\.serve: serving 6 pairs on (http://127\.0\.0\.1:\d+)\n", first.get("line", ""))
    if match is None:
        process.kill()
        log.seek(0)
        raise AssertionError(f"the server did not start: {first.get('line')!r}\n{log.read()[-3000:]}")
    server = Server(process, match.group(1), token)
    server.log = lambda: (log.seek(0), log.read())[1]
    return server


@pytest.fixture(scope="module")
def server(trained):
    checkpoint = trained.get("target", "target", UPDATES)
    server = start_server(checkpoint, "--max-expert-sets", "4", "--max-texts", "32", "--max-body-bytes", "65536",
                          "--max-queue-requests", str(CONCURRENCY))  # the load test's clients all taken
    yield server
    server.process.terminate()
    assert server.process.wait(60) == 0  # SIGTERM: a clean stop


@pytest.fixture(scope="module")
def extracted_dir(trained, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("serve_extracted"))
    checkpoint = trained.get("target", "target", UPDATES)
    assert extract.main(["--checkpoint", checkpoint, "--all-lang-pairs", "--output-dir", folder]) == 0
    return folder


def test_every_pair_translates_like_its_extracted_checkpoint(server, extracted_dir, data_dir):
    outputs = {}
    for pair in LANG_PAIRS:
        lines = raw_lines(data_dir, pair)
        outputs[pair] = server.translate(pair, lines)
        reference = translate.load_translator(os.path.join(extracted_dir, f"{pair}.pt"), pair)
        assert outputs[pair] == translate.translate_lines(reference, lines, beam=BEAM, max_len_b=MAX_LEN), pair
        assert len(set(outputs[pair])) >= 3, pair  # not one degenerate output for every sentence
    assert len({tuple(texts) for texts in outputs.values()}) == len(LANG_PAIRS)  # each pair its own
    # one pair through the real fairseq-generate on its extracted checkpoint, same options
    source, target = "de", "en"
    generate = run_in_process(["fairseq-generate", data_dir, *TASK_ARGS, "--source-lang", source, "--target-lang", target,
                    "--path", os.path.join(extracted_dir, "de-en.pt"), "--gen-subset", "test", "--beam", str(BEAM),
                    "--max-len-a", "0", "--max-len-b", str(MAX_LEN), "--batch-size", "16", "--cpu", *NO_LOADER_WORKERS])
    pieces = {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t[^\t]*\t(.*)$", generate.stdout, re.M)}
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data_dir, "spm.model"))
    assert sorted(pieces) == list(range(TEST_LINES))
    assert outputs["de-en"] == [sp.decode(pieces[i].split()).strip() for i in range(TEST_LINES)]
    status, health = server.request("/health")
    assert status == 200 and health["expert_sets"]["loads"] == 4 and health["expert_sets"]["evictions"] == 0


def test_an_extracted_checkpoint_serves_its_own_pair(server, extracted_dir, data_dir):
    weights = SharedWeights(os.path.join(extracted_dir, "en-fr.pt"))
    service = TranslationService(weights)
    assert service.pairs == ["en-fr"] and weights.layers == []
    lines = raw_lines(data_dir, "en-fr")[:6]
    assert service.translate("en-fr", lines, BEAM, MAX_LEN) == server.translate("en-fr", lines)
    with pytest.raises(TaskMoeError, match="is the en-fr sub-network; it cannot serve de-en"):
        TranslationService(weights, ["de-en"])


def test_bad_input_is_a_one_line_json_error(server):
    cases = [
        ({"lang_pair": "en-xx", "texts": ["Hello"]}, 400, "unknown lang_pair 'en-xx'; this server translates en-de, de-en"),
        ({"lang_pair": "en-de", "texts": []}, 400, '"texts" is empty'),
        ({"lang_pair": "en-de", "texts": "Hello"}, 400, '"texts" must be a list of strings'),
        ({"lang_pair": "en-de", "texts": ["x"] * 33}, 400, "at most 32 per request"),
        ({"lang_pair": "en-de", "texts": ["Hello", "word " * 1100]}, 400, "the model takes at most 1023 (split the text)"),
        ({"lang_pair": "en-de", "texts": ["Hello"], "beam": 0}, 400, '"beam" must be an integer from 1 to 8'),
        ({"lang_pair": "en-de", "texts": ["Hello"], "beam": "4"}, 400, '"beam" must be an integer'),
        ({"lang_pair": "en-de", "texts": ["Hello"], "max_len_b": 201}, 400, '"max_len_b" must be an integer from 1 to 200'),
        ({"lang_pair": "en-de", "text": ["Hello"]}, 400, "unknown field 'text'"),
        (["en-de"], 400, "the body must be a JSON object"),
    ]
    for body, status, needle in cases:
        got_status, got = server.request("/translate", body)
        assert (got_status, list(got)) == (status, ["error"]) and needle in got["error"], (body, got)
        assert "\n" not in got["error"]
    for raw, status, needle in [(b'{"lang_pair": "en-de", "texts": [', 400, "malformed JSON body"),
                                (b"\xff\xfe", 400, "malformed JSON body"),
                                (b'{"texts": ["' + b"a" * 70000 + b'"]}', 413, "request body over 65536 bytes")]:
        got_status, got = server.request("/translate", raw=raw)
        assert got_status == status and needle in got["error"], got
    assert server.request("/nothing-here") == (404, {"error": "Not Found: GET /nothing-here; the API is POST /translate, "
                                                              "GET /pairs, GET /health, GET /"})
    assert server.request("/pairs")[1]["pairs"] == LANG_PAIRS
    assert server.translate("en-de", ["", "Hello"])[0] == ""  # still serving; an empty text stays empty


@pytest.mark.slow
def test_load_mixing_all_pairs_has_no_error_and_no_memory_growth(server, data_dir):
    import aiohttp

    texts = {pair: raw_lines(data_dir, pair)[:6] for pair in LANG_PAIRS}
    jobs = [(LANG_PAIRS[i % len(LANG_PAIRS)], i % 6) for i in range(LOAD_REQUESTS)]
    want = {(pair, j): server.translate(pair, [texts[pair][j]], beam=1, max_len_b=12)[0] for pair, j in set(jobs)}

    async def send(session, limit, pair, j):
        async with limit:
            body = {"lang_pair": pair, "texts": [texts[pair][j]], "beam": 1, "max_len_b": 12}
            async with session.post(server.url + "/translate", json=body) as response:
                return response.status, (await response.json())

    async def phase(selected):
        limit = asyncio.Semaphore(CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await asyncio.gather(*(send(session, limit, pair, j) for pair, j in selected))

    results = asyncio.run(phase(jobs[:WARM_UP]))
    rss_warm = server.rss_mib()
    results += asyncio.run(phase(jobs[WARM_UP:]))
    rss_end = server.rss_mib()
    assert len(results) == LOAD_REQUESTS
    errors = [body for status, body in results if status != 200]
    assert not errors, errors[:3]
    wrong = [(job, body) for job, (_, body) in zip(jobs, results) if body["translations"] != [want[job]]]
    assert not wrong, wrong[:3]  # concurrent requests never get another request's (or pair's) translation
    assert rss_end - rss_warm < RSS_TOLERANCE_MIB, (rss_warm, rss_end)
    _, health = server.request("/health")
    assert health["worker"]["groups"] < LOAD_REQUESTS  # requests waiting together were decoded together
    assert health["expert_sets"]["evictions"] == 0


@pytest.mark.slow
def test_page_translates_in_headless_chromium(server, tmp_path):
    from serving_screenshot import translate_in_browser

    text = "Click the button to open the dialog."
    shot = str(tmp_path / "page.png")
    shown, error = translate_in_browser(server.url, "en-fr", text, shot)
    assert error == ""
    assert shown == server.translate("en-fr", [text], max_len_b=200)[0] != ""  # the page sends the defaults
    with open(shot, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
    _, error = translate_in_browser(server.url, "en-de", "word " * 1100, None)
    assert "the model takes at most 1023" in error  # the page shows the API's error line


def test_bad_options_are_one_line(trained, tmp_path, capsys):
    def cli(*args):
        status = serve_cli.cli(list(args))
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("taskmoe_fairseq.serve: error: "), lines
        return lines[0]

    checkpoint = trained.get("token", "target")
    assert "none.pt: no such checkpoint file" in cli("--checkpoint", str(tmp_path / "none.pt"))
    assert "unknown language pair en-xx" in cli("--checkpoint", checkpoint, "--lang-pairs", "en-de,en-xx")
    assert "--max-expert-sets must be at least 1" in cli("--checkpoint", checkpoint, "--max-expert-sets", "0")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert "truncated or corrupt" in cli("--checkpoint", str(broken))
    assert "--host 0.0.0.0 is reachable from other machines and nothing guards it: pass --auth-token-file FILE" in cli(
        "--checkpoint", checkpoint, "--host", "0.0.0.0")
    assert "--host 192.168.1.2 is reachable" in cli("--checkpoint", checkpoint, "--host", "192.168.1.2", "--max-texts", "4")
    assert "cannot read it" in cli("--checkpoint", checkpoint, "--auth-token-file", str(tmp_path / "none"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert f"--auth-token-file {empty} is empty" in cli("--checkpoint", checkpoint, "--auth-token-file", str(empty))
    assert "--request-timeout must be a number of seconds above 0" in cli("--checkpoint", checkpoint, "--request-timeout", "0")
    assert "--max-queue-requests must be at least 1" in cli("--checkpoint", checkpoint, "--max-queue-requests", "0")
    if not torch.cuda.is_available():  # the device choice is taskmoe_fairseq.devices' (tests/test_devices.py)
        assert "--device cuda: no CUDA device is visible" in cli("--checkpoint", checkpoint, "--device", "cuda")
    assert "--device-index 1 numbers CUDA devices" in cli("--checkpoint", checkpoint, "--device", "cpu", "--device-index", "1")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    for guard in (["--insecure"], ["--auth-token-file", str(token)]):  # a guarded or explicitly open host is taken
        options = serve_cli.parse_args(["--checkpoint", checkpoint, "--host", "0.0.0.0", *guard])
        assert options.auth_token == (None if guard == ["--insecure"] else "s3cret")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert serve_cli.parse_args(["--checkpoint", checkpoint, "--host", host]).auth_token is None


# ---------------------------------------------------------------- overload and abuse (issue 28), one guarded server

TOKEN = "test-token-Zq3"
MAX_QUEUE_TOKENS = 100000
REQUEST_TIMEOUT = 10
HEAVY = dict(beam=8, max_len_b=200)  # 32 texts at beam 8: the worker is busy for a while


def heavy_texts(count=32):
    return [f"Click the button number {i} to open the dialog and see the settings." for i in range(count)]


@pytest.fixture(scope="module")
def guarded(trained, tmp_path_factory):
    """A server with small queue bounds, a deadline and a bearer token, on its own copy of the checkpoint
    (the last test changes that copy)."""
    folder = tmp_path_factory.mktemp("guarded")
    checkpoint = str(folder / "serve.pt")
    shutil.copyfile(trained.get("target", "target", UPDATES), checkpoint)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    server = start_server(checkpoint, "--max-expert-sets", "1", "--max-texts", "32", "--max-body-bytes", "4000000",
                          "--max-queue-requests", "2", "--max-queue-tokens", str(MAX_QUEUE_TOKENS),
                          "--request-timeout", str(REQUEST_TIMEOUT), "--auth-token-file", str(token_file), token=TOKEN)
    server.checkpoint = checkpoint
    yield server
    server.process.terminate()
    assert server.process.wait(60) == 0


class PartialPost:
    """A raw connection that sent a ``POST /translate``'s headers and only the start of its body."""

    def __init__(self, server, length=1000, start=b'{"lang_pair": '):
        url = urllib.parse.urlsplit(server.url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=120)
        head = [f"POST /translate HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json",
                f"Content-Length: {length}"] + [f"{k}: {v}" for k, v in server.headers(None).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + start)

    def answer(self):
        """``(status, headers, JSON body)`` of the answer (read up to its Content-Length)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            chunk = self.sock.recv(65536)
            assert chunk
            body += chunk
        return int(lines[0].split()[1]), headers, json.loads(body)

    def close(self):
        self.sock.close()


def test_json_is_utf8_and_client_input_is_never_a_500(guarded):
    deep = b"[" * 200000 + b"]" * 200000
    for raw, needle in [(deep, "malformed JSON body (nested too deeply)"),
                        (b'{"lang_pair": "en-de", "texts": ["\\ud800"]}', "texts[0] is not valid Unicode"),
                        (b'{"lang_pair": "en-de", "texts": ["ok", "a\\udfffb"]}', "texts[1] is not valid Unicode"),
                        (b'{"lang_pair": "\\ud800", "texts": ["x"]}', "unknown lang_pair '\\ud800'"),
                        (b'{"\\ud800": 1}', "unknown field '\\ud800'"),
                        (json.dumps({"lang_pair": "x" * 100000, "texts": ["a"]}).encode(), "unknown lang_pair 'xxx"),
                        (b'{"lang_pair": "en-de", "lang_pair": "de-en", "texts": ["a"]}', "the field 'lang_pair' appears more than once"),
                        (b'{"lang_pair": "en-de", "texts": ["a"], "beam": ' + b"9" * 5000 + b"}", "(a number with too many digits)")]:
        status, headers, body = guarded.raw_request("/translate", raw)
        assert (status, headers["Content-Type"]) == (400, "application/json; charset=utf-8"), body[:200]
        error = json.loads(body)["error"]
        assert needle in error and "\n" not in error and len(error) < 300, error
    for encoding in ("gzip", "deflate"):  # plain JSON announced as compressed: aiohttp cannot decode it (was a 500)
        status, headers, body = guarded.raw_request("/translate", b'{"lang_pair": "en-de", "texts": ["hi"]}',
                                                    headers={**guarded.headers(), "Content-Encoding": encoding})
        assert (status, headers["Content-Type"]) == (400, "application/json; charset=utf-8"), body[:200]
        assert json.loads(body)["error"].startswith("unreadable request body (")
    # answers are UTF-8, not \u escapes
    status, _, body = guarded.raw_request("/translate", json.dumps({"lang_pair": "en-ф", "texts": ["x"]}).encode())
    assert status == 400 and "unknown lang_pair 'en-ф'".encode() in body and b"\\u" not in body
    status, headers, body = guarded.raw_request("/translate", json.dumps({"lang_pair": "en-ru", "texts": heavy_texts(2)}).encode())
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert b"\\u" not in body and any("\u0400" <= char <= "\u04ff" for char in body.decode("utf-8"))  # Cyrillic, raw


def test_only_json_bodies_with_the_token_are_taken(guarded):
    body = json.dumps({"lang_pair": "en-de", "texts": ["Hello"]}).encode()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
        status, _, answer = guarded.raw_request("/translate", body, headers)
        assert status == 415 and "Content-Type: application/json" in json.loads(answer)["error"], (content_type, answer)
    for headers in ({"Content-Type": "application/json"}, {"Content-Type": "application/json", "Authorization": "Bearer nope"},
                    {"Content-Type": "application/json", "Authorization": TOKEN},
                    {"Content-Type": "application/json", "Authorization": "Bearer \xff\xfe"}):  # not UTF-8
        status, answer_headers, answer = guarded.raw_request("/translate", body, headers)
        assert status == 401 and answer_headers["WWW-Authenticate"].startswith("Bearer"), answer
        assert "bearer token" in json.loads(answer)["error"]
    assert guarded.raw_request("/pairs", None, {})[0] == 401
    assert guarded.raw_request("/health", None, {})[0] == 200 and guarded.raw_request("/", None, {})[0] == 200
    status, answer = guarded.request("/translate", raw=body)  # the token, JSON: served
    assert status == 200 and len(answer["translations"]) == 1


def test_a_full_queue_is_a_503_with_retry_after_and_a_client_that_leaves_frees_its_place(guarded):
    holders = [PartialPost(guarded), PartialPost(guarded)]  # two places taken, their bodies never come
    guarded.wait_for(lambda health: health["queue"]["requests"] == 2, "2 requests taken")
    status, headers, body = guarded.raw_request("/translate", json.dumps({"lang_pair": "en-de", "texts": ["Hi"]}).encode())
    assert (status, headers["Retry-After"]) == (503, "1") and "busy" in json.loads(body)["error"]
    for holder in holders:
        holder.close()
    guarded.wait_for(lambda health: health["queue"]["requests"] == 0, "the places given back")
    assert guarded.translate("en-de", ["Hi"]) == guarded.translate("en-de", ["Hi"])


def test_the_token_bound_is_a_413_for_one_request_and_a_503_while_full(guarded):
    status, body = guarded.request("/translate", {"lang_pair": "en-ru", "texts": ["word " * 200] * 32, **HEAVY})
    assert status == 413 and f"the server holds {MAX_QUEUE_TOKENS} at most" in body["error"], body
    heavy = dict(lang_pair="en-ru", texts=heavy_texts(), **HEAVY)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(guarded.request, "/translate", heavy)
        guarded.wait_for(lambda health: health["queue"]["tokens"] > MAX_QUEUE_TOKENS / 2, "the first request's tokens taken")
        status, body = guarded.request("/translate", heavy)  # fits alone, not beside the first
        assert status == 503 and "queue tokens in use" in body["error"], body
        assert first.result()[0] == 200
    assert guarded.health()["queue"] == {"requests": 0, "max_requests": 2, "tokens": 0, "max_tokens": MAX_QUEUE_TOKENS,
                                         "request_timeout": REQUEST_TIMEOUT}


@pytest.mark.slow
def test_a_request_past_its_deadline_is_a_504(guarded):
    late = PartialPost(guarded)  # its body never completes: the deadline answers
    status, headers, body = late.answer()
    late.close()
    assert (status, headers["content-type"]) == (504, "application/json; charset=utf-8")
    assert f"no answer within {REQUEST_TIMEOUT} s (the server's --request-timeout)" in body["error"]
    guarded.wait_for(lambda health: health["queue"]["requests"] == 0, "the place given back")


def test_work_of_a_client_that_left_is_dropped(guarded):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        kept = pool.submit(guarded.request, "/translate", dict(lang_pair="en-ru", texts=heavy_texts(), **HEAVY))
        before = guarded.wait_for(lambda health: health["queue"]["tokens"] > 0, "the first request queued")
        body = json.dumps(dict(lang_pair="en-ru", texts=heavy_texts(8), beam=4, max_len_b=30)).encode()  # another group
        left = PartialPost(guarded, length=len(body), start=body)
        guarded.wait_for(lambda health: health["queue"]["tokens"] > before["queue"]["tokens"], "the second one queued")
        left.close()  # its client goes away while the first is decoded
        assert kept.result()[0] == 200
    settled = sum(before["worker"][key] for key in ("requests_done", "requests_dropped")) + 2
    after = guarded.wait_for(lambda health: health["queue"]["requests"] == 0 and sum(
        health["worker"][key] for key in ("requests_done", "requests_dropped")) == settled, "both settled by the worker")
    assert after["worker"]["requests_dropped"] == before["worker"]["requests_dropped"] + 1, (before["worker"], after["worker"])
    assert after["worker"]["requests_done"] == before["worker"]["requests_done"] + 1  # the first only


def test_health_answers_while_a_huge_text_is_checked(guarded):
    import aiohttp

    async def scenario():
        async with aiohttp.ClientSession(headers=guarded.headers(None)) as session:
            huge = asyncio.ensure_future(session.post(guarded.url + "/translate",
                                                      json={"lang_pair": "en-de", "texts": ["word " * 200000]}))
            taken = 0
            while not taken:  # until the server has taken the request
                async with session.get(guarded.url + "/health") as response:
                    taken = (await response.json())["queue"]["requests"]
            async with session.get(guarded.url + "/health") as response:  # while its text is encoded and counted
                assert response.status == 200 and not huge.done()
            async with await huge as response:
                return response.status, await response.json()

    status, body = asyncio.run(scenario())
    assert status == 400 and re.fullmatch(r"texts\[0\] has \d+ tokens; the model takes at most 1023 \(split the text\)",
                                          body["error"]), body


@pytest.mark.slow
def test_overload_answers_every_taken_request_right_and_refuses_the_rest(guarded):
    """benchmarks/measure_overload.py, bounded: 10x the places (2) in clients, 80 requests, 30% abandoned
    by their clients at random; asserts statuses, answers and memory, never time."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import measure_overload

    pool = measure_overload.request_pool(["en-de", "en-ru"], max_texts=8)
    answers = asyncio.run(measure_overload.sequential_answers(guarded.url, guarded.headers(None), pool))
    assert asyncio.run(measure_overload.burst(guarded.url, guarded.headers(None), pool[-1], 2)) == [200, 200]  # the warm-up
    bound = guarded.health()["rss_mib"] + 2 * 4000000 * measure_overload.BODY_FACTOR / 2 ** 20  # 2 places, 4 MB bodies
    result = asyncio.run(measure_overload.overload(guarded.url, guarded.headers(None), pool, clients=20, duration=3600,
                                                   max_sent=80, disconnect_rate=0.3, seed=1, health_interval=0.05,
                                                   abandon_after=0.3))
    summary = measure_overload.check(result, answers, bound)
    assert summary["ok"], summary  # only 200 (each equal to its sequential answer), 503 with Retry-After, 504
    assert summary["sent"] == 80 and summary["statuses"].get("200") and summary["statuses"].get("503"), summary
    assert summary["peak_queue_requests"] <= 2
    settled = guarded.wait_for(lambda health: health["queue"]["requests"] == 0, "every request settled")
    assert settled["queue"]["tokens"] == 0


def test_a_touched_checkpoint_is_no_change_and_a_changed_one_is_the_servers_503(guarded, trained):
    guarded.translate("en-de", ["Hello"])  # one expert set at most: the pairs below are loaded from the file again
    os.utime(guarded.checkpoint)  # same bytes, new time
    want = guarded.translate("en-fr", heavy_texts(3))
    assert guarded.health()["status"] == "ok"
    before = os.stat(guarded.checkpoint)
    with open(guarded.checkpoint, "r+b") as changed:  # bytes rewritten in place, size and mtime kept
        changed.seek(before.st_size // 2)
        changed.write(bytes(255 - byte for byte in changed.read(64)))
    os.utime(guarded.checkpoint, ns=(before.st_atime_ns, before.st_mtime_ns))
    status, body = guarded.request("/translate", {"lang_pair": "de-en", "texts": ["Hello"]})
    assert status == 503 and "checkpoint changed on disk" in body["error"], body
    with open(trained.get("token", "target"), "rb") as other, open(guarded.checkpoint, "wb") as changed:
        shutil.copyfileobj(other, changed)  # another checkpoint written over it in place
    status, body = guarded.request("/translate", {"lang_pair": "en-ru", "texts": ["Hello"]})
    assert status == 503 and "checkpoint changed on disk" in body["error"] and "/" not in body["error"], body
    status, health = guarded.request("/health")
    assert status == 503 and "checkpoint changed on disk" in health["status"] and "/" not in health["status"]
    assert guarded.translate("en-fr", heavy_texts(3)) == want  # what is loaded still serves
    assert f"{guarded.checkpoint} changed on disk" in guarded.log()  # the detail is in the log


@pytest.mark.slow
def test_sigterm_answers_or_refuses_what_is_in_flight_and_exits(trained):
    server = start_server(trained.get("target", "target", UPDATES), "--max-texts", "32")
    import aiohttp

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async def post():
                async with session.post(server.url + "/translate", json=dict(lang_pair="en-ru", texts=heavy_texts(),
                                                                             **HEAVY)) as response:
                    return response.status, await response.json()

            posts = [asyncio.ensure_future(post()) for _ in range(3)]
            waiting = PartialPost(server)
            await asyncio.to_thread(server.wait_for, lambda health: health["queue"]["requests"] == 4, "4 requests taken")
            server.process.terminate()
            answered = await asyncio.gather(*posts)
            return answered, await asyncio.to_thread(waiting.answer)

    try:
        answered, (status, _, body) = asyncio.run(scenario())
        assert server.process.wait(60) == 0
    finally:
        if server.process.poll() is None:  # a failure above: leave no server behind
            server.process.kill()
    assert (status, body) == (503, {"error": "the server is shutting down; retry later"})  # its body never came
    assert all(status in (200, 503) for status, _ in answered) and any(status == 503 for status, _ in answered), answered
    assert "Traceback" not in server.log()
