"""python -m taskmoe_fairseq.serve: one process serves every pair of a full checkpoint.

In-process (token/target, 12 updates: the token-routed encoder stays whole): each pair's model
is the model's own extraction, shares every non-expert tensor with the others, and the store
evicts and frees expert sets. Over loopback, against one real server (the 300-update
target/target model of test_translate/test_export, which gives varied outputs; 6 pairs, 4 expert
sets: de-en, fr-en and ru-en share the target-English one): every pair's translations equal its
extracted checkpoint's (in-process, and one pair through the real fairseq-generate), bad input
is a 4xx JSON line while the server keeps serving, 2,000 concurrent small requests mixing all
pairs give no error, the right answer each and no resident-memory growth, and the page works in
headless Chromium.
"""

import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import weakref

import pytest
import sentencepiece
import torch

from cli_helpers import ENV, LANG_PAIRS, NO_LOADER_WORKERS, REPO, TASK_ARGS, TEST_LINES, raw_lines, run_warm
from taskmoe_fairseq import extract, translate
from taskmoe_fairseq.errors import TaskMoeError
from taskmoe_fairseq.serving import cli as serve_cli
from taskmoe_fairseq.serving.service import TranslationService
from taskmoe_fairseq.serving.shared_weights import SharedWeights

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
    assert "encoder.layers.1.moe.experts.3.fc1.weight" in weights.shared  # the token-routed layer is, whole
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


# ---------------------------------------------------------------- over loopback: one real server


class Server:
    def __init__(self, process, url):
        self.process, self.url = process, url

    def request(self, path, body=None, raw=None):
        """``(status, JSON body)`` of ``GET path`` or ``POST path`` with ``body`` (JSON) / ``raw`` bytes."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def translate(self, pair, texts, beam=BEAM, max_len_b=MAX_LEN):
        status, body = self.request("/translate", {"lang_pair": pair, "texts": texts, "beam": beam, "max_len_b": max_len_b})
        assert status == 200, body
        return body["translations"]

    def rss_mib(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def server(trained):
    checkpoint = trained.get("target", "target", UPDATES)
    command = [sys.executable, "-m", "taskmoe_fairseq.serve", "--checkpoint", checkpoint, "--port", "0",
               "--max-expert-sets", "4", "--max-texts", "32", "--max-body-bytes", "65536", "--threads", "1"]
    process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = {}
    reader = threading.Thread(target=lambda: first.setdefault("line", process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    match = re.fullmatch(r"taskmoe_fairseq\.serve: serving 6 pairs on (http://127\.0\.0\.1:\d+)\n", first.get("line", ""))
    if match is None:
        process.kill()
        raise AssertionError(f"the server did not start: {first.get('line')!r}\n{process.stderr.read()[-3000:]}")
    yield Server(process, match.group(1))
    process.terminate()
    assert process.wait(60) == 0  # SIGTERM: a clean stop


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
    generate = run_warm(["fairseq-generate", data_dir, *TASK_ARGS, "--source-lang", source, "--target-lang", target,
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
