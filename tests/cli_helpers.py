"""Running the real fairseq CLIs (and ours) on the bundled real-text fixture."""

import contextlib
import copy
import io
import os
import re
import subprocess
import sys
import tarfile
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "taskmoe_fairseq")
BUNDLED = os.path.join(REPO, "examples", "data", "bundled", "libreoffice-6pairs.tar.xz")

LANGS = "en,de,fr,ru"
FIXTURE_LANGS = ("de", "fr", "ru")
LANG_PAIRS = [f"{a}-{b}" for xx in FIXTURE_LANGS for a, b in (("en", xx), (xx, "en"))]
TRAIN_LINES, VALID_LINES, TEST_LINES = 400, 40, 24

# one thread per process: the CI machine has 2 cores and runs two CLIs at a time
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")

TASK_ARGS = [
    "--user-dir", PLUGIN,
    "--task", "multilingual_translation_taskmoe",
    "--lang-pairs", ",".join(LANG_PAIRS),
    "--langs", LANGS,
    "--encoder-langtok", "tgt",
    "--decoder-langtok",
]


def run(command, check=True, stdin=None, timeout=600):
    result = subprocess.run(
        command, env=ENV, capture_output=True, text=True, input=stdin, timeout=timeout, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)}\nexit {result.returncode}\n--- stderr (tail)\n{result.stderr[-4000:]}"
        )
    return result


def run_warm(command, check=True, stdin=None, timeout=600, env=ENV):
    """``run``, but the process is forked from an interpreter that has already imported torch and
    fairseq (tests/forked_cli.py): the same command, entry point, exit status and output, without
    seconds of imports per process. Tests of what a cold start prints (import-time output, the
    one real-process test per tool) use ``run``."""
    from forked_cli import run_forked

    result = run_forked(command, env, REPO, stdin, timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)}\nexit {result.returncode}\n--- stderr (tail)\n{result.stderr[-4000:]}"
        )
    return result


# what differs from run to run in fairseq's log lines: clock times, durations and speeds
_TIMES = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d+:\d\d:\d\d\.\d+|[\d.]+ ?(?:seconds|s)\b|"
                    r"\b(?:wps|ups|wall|train_wall|sentences/s|tokens/s)[ =][\d.]+|[\d.]+ (?:sentences|tokens)/s")


def mask_times(log):
    """``log`` with every clock time, duration and speed replaced by ``T`` (to compare two runs)."""
    return _TIMES.sub("T", log)


_PARSED_OVERRIDES = {}


@contextlib.contextmanager
def _cached_override_parsing():
    """fairseq turns every option into a hydra override string and hydra parses each with its
    ANTLR grammar, most of a second per command; the parse of a string is always the same, so
    in-process runs parse each string once (a copy per use) while converting their options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    original = OverridesParser.parse_rule

    def parse_rule(self, text, rule_name):
        if (text, rule_name) not in _PARSED_OVERRIDES:
            _PARSED_OVERRIDES[(text, rule_name)] = original(self, text, rule_name)
        return copy.deepcopy(_PARSED_OVERRIDES[(text, rule_name)])

    OverridesParser.parse_rule = parse_rule
    try:
        yield
    finally:
        OverridesParser.parse_rule = original


def run_in_process(command, stdin=None):
    """``fairseq-generate`` / ``fairseq-interactive`` through the tool's own parser and ``main``
    in this process: the same code as the command, without a fresh interpreter and its seconds
    of imports. Returns the command's ``stdout`` (``stdin`` feeds fairseq-interactive). Each tool
    keeps one real-process test (test_cli_end_to_end, test_extract, test_bad_input)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import generate, interactive

    tool, args = command[0], command[1:]
    module, parser = {
        "fairseq-generate": (generate, options.get_generation_parser),
        "fairseq-interactive": (interactive, options.get_interactive_generation_parser),
    }[tool]
    with _cached_override_parsing():
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser(), args))
    out, saved_stdin = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin or "")  # fairseq-interactive reads "-" through fileinput
    try:
        with contextlib.redirect_stdout(out):
            module.main(cfg)
    finally:
        sys.stdin = saved_stdin
    return SimpleNamespace(stdout=out.getvalue(), stderr="", returncode=0)


def run_main(module, *args, check=True):
    """One of our commands (``python -m <module> ARGS``) through its ``main`` in this process, with
    its exit status and what it printed (the exit status and the one-line error come from
    ``errors.run_cli``, as in a real process). Each command keeps a real-process test too: only a
    real process shows that nothing else reaches stderr."""
    import importlib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module(module).main(list(args)) or 0
        except SystemExit as exit:  # argparse's own usage errors
            code = exit.code if isinstance(exit.code, int) else 2
    result = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{module} {' '.join(args)}\nexit {code}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def make_raw_fixture(out_dir):
    """A 3-language slice (both directions = 6 tasks) of the bundled LibreOffice corpus."""
    with tarfile.open(BUNDLED) as archive:
        archive.extractall(out_dir, filter="data")
    source = os.path.join(out_dir, "libreoffice-6pairs", "raw")
    raw = os.path.join(out_dir, "raw")
    os.makedirs(raw, exist_ok=True)
    for xx in FIXTURE_LANGS:
        for split, limit in (("train", TRAIN_LINES), ("valid", VALID_LINES), ("test", TEST_LINES)):
            for lang in ("en", xx):
                name = f"{split}.en-{xx}.{lang}"
                with open(os.path.join(source, name), encoding="utf-8") as src:
                    lines = [line for _, line in zip(range(limit), src)]
                with open(os.path.join(raw, name), "w", encoding="utf-8") as dst:
                    dst.writelines(lines)
    return raw


def raw_lines(data_dir, pair="en-de"):
    """The raw test sentences of ``pair``'s source side (what a user would translate), as
    binarize.py keeps them under ``<data_dir>/raw``."""
    source, target = pair.split("-")
    xx = target if source == "en" else source
    with open(os.path.join(data_dir, "raw", f"test.en-{xx}.{source}"), encoding="utf-8") as stream:
        return [line.rstrip("\n") for line in stream]


def train_command(data, save_dir, encoder_routing, decoder_routing, max_update, extra=()):
    return [
        "fairseq-train", data, *TASK_ARGS,
        "--arch", "taskmoe_transformer_tiny",
        "--encoder-moe-routing", encoder_routing,
        "--decoder-moe-routing", decoder_routing,
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "1500",
        "--max-update", str(max_update), "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--cpu", "--seed", "1", "--log-format", "simple", "--log-interval", "5",
        "--required-batch-size-multiple", "1", "--num-workers", "0",
        *extra,
    ]


# fairseq-generate's data loader in this process (its default, one worker process, adds about 5 s
# per run: the DataLoader waits that long for the worker to stop); the results are the same
NO_LOADER_WORKERS = ("--num-workers", "0")


def generate_command(data, checkpoint, pair, beam, loader=NO_LOADER_WORKERS):
    source, target = pair.split("-")
    return [
        "fairseq-generate", data, *TASK_ARGS,
        "--source-lang", source, "--target-lang", target,
        "--path", checkpoint, "--gen-subset", "test",
        "--beam", str(beam), "--max-len-a", "1.2", "--max-len-b", "10",
        "--batch-size", "16", "--required-batch-size-multiple", "1",
        "--cpu", *loader,
    ]


def parse_generation(stdout):
    """``{sentence id: (hypothesis, score, [positional scores])}`` from fairseq-generate output."""
    hypotheses, positional = {}, {}
    for line in stdout.splitlines():
        match = re.match(r"^([HP])-(\d+)\t(.*)$", line)
        if not match:
            continue
        kind, sentence, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "H":
            score, text = rest.split("\t", 1)
            hypotheses[sentence] = (text, float(score))
        else:
            positional[sentence] = [float(value) for value in rest.split()]
    return {sentence: (text, score, positional.get(sentence, [])) for sentence, (text, score) in hypotheses.items()}


def python_module(module, *args):
    return [sys.executable, "-m", module, *args]


TRAIN_INNER = re.compile(r"\| train_inner \| epoch \d+:\s+\d+ / \d+ (.*)$", re.MULTILINE)
TIMING = {"wps", "ups", "wall", "train_wall", "gb_free", "ppl"}  # timing, and ppl (2 ** loss, 2 decimals)


def train_metrics(result):
    """One ``{metric: value}`` per logged update, timing left out."""
    rows = []
    for line in TRAIN_INNER.findall(result.stdout + result.stderr):
        pairs = (item.split("=", 1) for item in line.split(", "))
        rows.append({key: float(value) for key, value in pairs if key not in TIMING})
    return rows


def assert_same_metrics(ep_metrics, ddp_metrics):
    assert [sorted(row) for row in ep_metrics] == [sorted(row) for row in ddp_metrics]
    for update, (ep_row, ddp_row) in enumerate(zip(ep_metrics, ddp_metrics), 1):
        for key, value in ep_row.items():
            # fairseq logs 3 decimals: equal up to where the rounding of a value near a boundary flips
            assert abs(value - ddp_row[key]) <= 1.001e-3, (update, key, value, ddp_row[key])


def train_in_process(command):
    """``fairseq-train`` (``command`` as for ``train_command``) through its parser and ``main`` in
    this process, as fairseq's own tests run it; errors propagate as exceptions (the plugin's
    excepthook turns a TaskMoeError into the command's one line, see test_bad_input)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    assert command[0] == "fairseq-train"
    with _cached_override_parsing():
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), command[1:]))
    train.main(cfg)
