"""Running the real fairseq CLIs (and ours) on the bundled real-text fixture."""

import contextlib
import io
import logging
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


# what differs from run to run in fairseq's log lines: clock times, durations and speeds
_TIMES = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d+:\d\d:\d\d\.\d+|[\d.]+ ?(?:seconds|s)\b|"
                    r"\b(?:wps|ups|wall|train_wall|sentences/s|tokens/s)[ =][\d.]+|[\d.]+ (?:sentences|tokens)/s")


def mask_times(log):
    """``log`` with every clock time, duration and speed replaced by ``T`` (to compare two runs)."""
    return _TIMES.sub("T", log)


# fairseq's commands: the console script's entry point, and where the command's log goes (fairseq-train
# configures logging to stdout before it imports fairseq; fairseq-generate and -interactive get
# the stderr logging that importing fairseq sets up)
FAIRSEQ_COMMANDS = {
    "fairseq-train": ("fairseq_cli.train", "stdout"),
    "fairseq-generate": ("fairseq_cli.generate", "stderr"),
    "fairseq-interactive": ("fairseq_cli.interactive", "stderr"),
}
LOG_FORMAT = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _logging_to(stream):
    """The root logger at INFO with fairseq's format, written to ``stream``, for the command's run
    (then as before): what a fresh interpreter's fairseq command logs."""
    root, handler = logging.getLogger(), logging.StreamHandler(stream)
    handler.setFormatter(LOG_FORMAT)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def _environment(env):
    """``os.environ`` with the variables of ``env`` that differ from it (e.g.
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, which torch reads when it loads), for the command's run."""
    changed = {key: value for key, value in (env or {}).items() if os.environ.get(key) != value}
    saved = {key: os.environ.get(key) for key in changed}
    os.environ.update(changed)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_in_process(command, check=True, stdin=None, env=None):
    """``command`` in this process, as fairseq's own tests run its commands (tests/utils.py there:
    ``train_translation_model``, ``generate_main``): ``fairseq-train``, ``fairseq-generate`` and
    ``fairseq-interactive`` through the console script's ``cli_main``, ``python -m MODULE ARGS``
    through what ``python -m`` runs (``runpy.run_module``), with ``sys.argv`` set. Returns
    ``returncode``, ``stdout``, ``stderr`` as :func:`run` does: ``stdin`` is the command's standard
    input, fairseq's log goes where the real command writes it, ``SystemExit`` gives the status
    (argparse's usage errors: 2; our commands' one-line errors: 2), an uncaught exception goes
    through ``sys.excepthook`` (the plugin's one line for fairseq's commands) with status 1.
    ``env``: variables set for the run. Not thread-safe (it redirects ``sys.stdout``). Each
    command keeps a real-process smoke test (:func:`run`)."""
    import importlib
    import runpy
    import warnings

    if command[0] == sys.executable and command[1] == "-m":
        def entry_point():
            with warnings.catch_warnings():  # (runpy warns that the module was imported already: it runs a fresh copy, as python -m does)
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                runpy.run_module(command[2], run_name="__main__", alter_sys=True)

        argv, log_stream = command[2:], None
    elif command[0] in FAIRSEQ_COMMANDS:
        module, log_stream = FAIRSEQ_COMMANDS[command[0]]
        entry_point, argv = importlib.import_module(module).cli_main, list(command)
    else:
        raise ValueError(f"not a command run in-process: {command[0]} (use run for a real process)")

    out, err = io.StringIO(), io.StringIO()
    logs = contextlib.nullcontext() if log_stream is None else _logging_to(out if log_stream == "stdout" else err)
    saved = sys.argv, sys.stdin
    sys.argv, sys.stdin = argv, io.StringIO(stdin or "")  # fairseq-interactive reads "-" through fileinput
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _environment(env), logs:
            try:
                entry_point()
            except SystemExit as exit:  # argparse's usage errors, sys.exit(n) or sys.exit(message)
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
                    code = 1
            except Exception:  # what the interpreter does with an uncaught exception: the excepthook, status 1
                code = 1
                sys.excepthook(*sys.exc_info())
    finally:
        sys.argv, sys.stdin = saved
    result = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{' '.join(command)}\nexit {code}\n--- stderr (tail)\n{result.stderr[-4000:]}")
    return result


def run_main(module, *args, check=True, stdin=None):
    """``python -m <module> ARGS`` in this process (:func:`run_in_process`)."""
    return run_in_process(python_module(module, *args), check=check, stdin=stdin)


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
    """``fairseq-train`` (``command`` as for ``train_command``) through its ``main`` in this process,
    as fairseq's own tests run it; errors propagate as exceptions (the plugin's excepthook turns a
    TaskMoeError into the command's one line: :func:`run_in_process`)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    assert command[0] == "fairseq-train"
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), command[1:]))
    train.main(cfg)
