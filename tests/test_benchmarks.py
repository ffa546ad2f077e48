"""Smoke test of the benchmarks: every measuring script in --quick mode on a minuscule
model (--tiny), then the report on their records. Checks the records' layout and that the
report names every configuration measured; nothing here looks at wall-clock numbers."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

SCRIPTS = {"decoding": "measure_decoding.py", "training": "measure_training.py", "memory": "measure_memory.py"}
SERVING = ["dense", "dense_kffn", "full_token_token", "full_token_target", "extracted", "extracted_merged"]
ENVIRONMENT = {"command", "date", "cpu", "cores", "torch_threads", "python", "torch", "fairseq", "load_average_at_start"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The measuring scripts' and the report's ``main`` in this process (one import of torch and
    fairseq); the memory script starts its real ``--child`` process per model."""
    import importlib

    tmp_path = tmp_path_factory.mktemp("bench")
    paths = {}
    for kind, script in SCRIPTS.items():
        paths[kind] = str(tmp_path / f"{kind}.json")
        module = importlib.import_module(script[:-3])
        assert module.main(["--quick", "--tiny", "--experts", "4", "--out", paths[kind]]) == 0
    out = tmp_path / "report"
    import report

    assert report.main([*paths.values(), "--out", str(out)]) == 0
    loaded = {kind: json.load(open(path)) for kind, path in paths.items()}
    return loaded, (out / "serving_cost.md").read_text(), out


@pytest.mark.slow
def test_records_have_the_schema(records):
    import timing

    loaded, _, _ = records
    for kind, record in loaded.items():
        assert record["schema"] == timing.SCHEMA and record["kind"] == kind
        assert ENVIRONMENT <= set(record["environment"]), kind
        assert SCRIPTS[kind] in record["environment"]["command"] and "--quick" in record["environment"]["command"]
        assert record["config"]["experts"] == [4] and record["wall_seconds"] > 0
    decode = loaded["decoding"]["results"]["4"]
    assert set(decode["models"]) == set(SERVING)
    for model in decode["models"].values():
        assert set(model["settings"]) == {"greedy b64", "beam4 b64", "greedy b1", "beam4 b1"}
        for row in model["settings"].values():
            assert len(row["seconds_per_round"]) == loaded["decoding"]["config"]["rounds"]
            assert row["ratio_vs_dense_kffn"] > 0 and row["tokens_per_round"] > 0
    assert decode["models"]["extracted"]["identical_to_full_token_target"] == 1.0  # same arithmetic as the full model
    assert set(decode["profiles"]) == {"full_token_token", "full_token_target", "extracted", "dense_kffn"}
    train = loaded["training"]["results"]["4"]
    assert set(train) == {"token/token", "token/target", "target/target", "pair/pair", "static-pair/static-pair"}
    for row in train.values():
        assert row["words_per_s"] > 0 and {"gate", "dispatch", "experts", "total"} <= set(row["profile"])
    memory = loaded["memory"]["results"]
    assert set(memory["dense"]) == {"dense", "dense_kffn"} and set(memory["4"]) == set(SERVING[2:])
    for row in list(memory["4"].values()) + list(memory["dense"].values()):
        assert row["checkpoint_bytes"] > 0 and row["memory"]["peak_rss_mb"] >= row["memory"]["baseline_rss_mb"]
    assert memory["4"]["extracted"]["decoder_expert_params"] * 2 == memory["4"]["full_token_target"]["decoder_expert_params"]


@pytest.mark.slow
def test_report_names_every_configuration(records):
    from models import LABELS

    loaded, markdown, out = records
    for label in LABELS.values():
        assert f"| 4 | {label} |" in markdown
    for routing in loaded["training"]["results"]["4"]:
        assert f"| 4 | {routing} |" in markdown
    for setting in ("greedy b64", "beam4 b64", "greedy b1", "beam4 b1"):
        assert setting in markdown
    for record in loaded.values():
        assert record["environment"]["command"] in markdown
    assert "## Bars" in markdown and ("PASS" in markdown or "MISS" in markdown)
    assert markdown.count("| PASS |") + markdown.count("| MISS |") >= 6
    assert (out / "serving_cost.png").stat().st_size > 0


DOCS = os.path.join(REPO, "docs", "benchmarks")


def test_the_committed_records_render_to_the_committed_markdown(tmp_path):
    """docs/benchmarks/*.md are what report.py writes from the committed JSON records (no measuring)."""
    import report

    single = [os.path.join(DOCS, name) for name in ("ct2_export.json", "ddp_backend_cost.json")]
    assert report.main([*single, "--out", str(tmp_path)]) == 0
    for name in ("ct2_export.md", "ddp_backend_cost.md"):
        assert (tmp_path / name).read_text() == open(os.path.join(DOCS, name)).read(), name
    serving = [f"docs/benchmarks/{kind}.json" for kind in SCRIPTS]
    command = "python benchmarks/report.py " + " ".join(serving) + " --out docs/benchmarks"
    text, _ = report.markdown(report.load([os.path.join(REPO, path) for path in serving]), command)
    assert text == open(os.path.join(DOCS, "serving_cost.md")).read()


def test_serving_report_renders_the_committed_record(tmp_path):
    """measure_serving.py starts a dozen servers (minutes), so it is not run here: its committed
    record must keep the layout report_serving.py reads."""
    import report_serving

    path = os.path.join(REPO, "docs", "benchmarks", "serving.json")
    record = report_serving.load(path)
    assert ENVIRONMENT <= set(record["environment"])
    assert report_serving.main([path, "--out", str(tmp_path)]) is None
    markdown = (tmp_path / "serving.md").read_text()
    memory = record["results"]["memory"]
    for count in (1, 6, 12):
        assert f"| server, {count} pair{'s' if count > 1 else ''} in use | {memory[f'server_{count}_pairs_mib']:.0f} |" in markdown
    assert f"| {memory['extracted_12_processes_mib']:.0f} |" in markdown
    assert markdown.count("| batch 1 |") == 2 and markdown.count("| batch 16 |") == 2
    assert record["environment"]["command"] in markdown


def test_the_gpu_check_plans_every_step_and_names_the_cuda_ones_skipped(tmp_path, capsys):
    """``benchmarks/gpu_check.py --dry-run`` on this CPU: every step with its commands, the CUDA
    ones named as skipped; every command parses with its tool's own parser (so the plan a GPU user
    runs names only options that exist); the report renders."""
    import shlex

    import torch
    from test_docs import parse_problem  # each tool's own parser, as for the README's commands

    import gpu_check
    import report

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    steps = json.loads(out.read_text())["results"]["steps"]
    names = [step["name"] for step in steps]
    for name in ("train:fp16", "train:memory_efficient_fp16", "train:bf16", "train:amp", "full=extracted:fp16",
                 "full=extracted:bf16", "translate:cuda", "serve:cuda", "export:float16", "export:int8_float16",
                 "speed:dense", "speed:token/target", "speed:target/target"):
        assert name in names
    checked = set()
    for step in steps:
        skipped = step["needs_cuda"] and not torch.cuda.is_available()
        assert step["status"] == ("skipped: no CUDA" if skipped else "planned"), step
        for command in map(shlex.split, step["commands"]):
            if command[:2] == ["bash", "-c"]:  # a command with redirections
                command = shlex.split(command[2].split("<")[0])
            if command[0] in ("fairseq-train", "fairseq-generate"):
                tool, args = command[0], command[1:]
            elif command[1:2] == ["-m"]:
                tool, args = command[2], command[3:]
            else:
                tool, args = os.path.relpath(command[1], REPO), command[2:]
            assert parse_problem(tool, args) is None, (step["name"], tool, parse_problem(tool, args))
            checked.add(tool)
    assert checked >= {"fairseq-train", "fairseq-generate", "taskmoe_fairseq.extract", "taskmoe_fairseq.translate",
                       "taskmoe_fairseq.serve", "taskmoe_fairseq.export", "examples/data/binarize.py"}
    assert report.main([str(out), "--out", str(tmp_path)]) in (None, 0)
    rendered = (tmp_path / "gpu_check.md").read_text()
    assert "| train:amp | " in rendered and ("skipped: no CUDA" in rendered or torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
        assert "no CUDA device here" in capsys.readouterr().err


def test_stacked_experts_benchmark_records_every_form_and_setting(tmp_path):
    """measure_stacked_experts.py --quick --tiny: one record with the three compute forms of the
    same model per routing and setting and their ratios; the table render names every row (nothing
    here looks at the numbers)."""
    import measure_stacked_experts as stacked
    import timing

    path = str(tmp_path / "stacked.json")
    assert stacked.main(["--quick", "--tiny", "--experts", "4", "--out", path]) == 0
    record = json.load(open(path))
    assert record["schema"] == timing.SCHEMA and record["kind"] == "stacked_experts"
    assert ENVIRONMENT <= set(record["environment"]) and record["config"]["forms"] == ["loop", "bmm", "auto"]
    rows = record["results"]["4"]
    assert set(rows) == {"token/token", "token/target"}
    for settings in rows.values():
        assert set(settings) == {"train", "greedy", "beam4"}
        for row in settings.values():
            assert all(len(row[form]["cpu_seconds"]) == record["config"]["rounds"] for form in ("loop", "bmm", "auto"))
            assert row["auto_vs_loop"] > 0 and row["bmm_vs_loop"] > 0
    table = stacked.render(record)
    assert table.count("\n| 4 | token/") == 6
