"""tests/forked_cli.py (``cli_helpers.run_warm``) gives what a fresh interpreter gives: the same
exit status, stdout and stderr, for a ``-m`` module and a script, with stdin passed through
(the one-line errors of the plugin's commands included), and for fairseq's own commands, whose
logging depends on whether they configure it before or after importing fairseq (the fork server
has imported fairseq already and replays what that import did to logging), and torchrun's ranks,
which are forked from the same preloaded state (tests/forked_torchrun.py)."""

import os
import sys
import textwrap

from rank_runs import torchrun
from cli_helpers import REPO, generate_command, mask_times, python_module, run, run_warm

BUILD_CORPUS = os.path.join(REPO, "examples", "data", "build_corpus.py")


def assert_same(command, stdin=None):
    fresh, forked = run(command, check=False, stdin=stdin), run_warm(command, check=False, stdin=stdin)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    return forked


def test_a_module_exits_and_prints_as_in_a_fresh_interpreter(tmp_path):
    result = assert_same(python_module("taskmoe_fairseq.extract", "--checkpoint", str(tmp_path / "none.pt"),
                                       "--lang-pair", "en-de", "--report-only"))
    assert result.returncode == 2 and result.stderr.startswith("taskmoe_fairseq.extract: error: ")


def test_a_script_exits_as_in_a_fresh_interpreter():
    result = assert_same([sys.executable, BUILD_CORPUS, "--out", "/nonexistent", "--langs", "de,xx"])
    assert result.returncode == 2 and "--langs must be a non-empty subset" in result.stderr


def test_stdin_reaches_the_command():
    result = assert_same([sys.executable, "-m", "json.tool"], stdin='{"texts": ["ein", "zwei"]}')
    assert result.returncode == 0 and result.stdout == '{\n    "texts": [\n        "ein",\n        "zwei"\n    ]\n}\n'


def test_fairseq_generate_logs_as_in_a_fresh_interpreter(trained, data_dir):
    """fairseq-generate configures logging after importing fairseq, so fairseq's import decides its
    format and stream (stderr), with the line it logs while imported (about tensorboardX).
    fairseq-train, which configures logging first: test_bad_input's test_unknown_routing_name."""
    command = generate_command(data_dir, trained.get("token", "target"), "en-de", 1)
    fresh, forked = run(command), run_warm(command)
    for stream in ("stdout", "stderr"):
        assert mask_times(getattr(forked, stream)) == mask_times(getattr(fresh, stream)), stream
    assert "INFO:fairseq.tasks.text_to_speech:Please install tensorboardX" in fresh.stderr  # logged while fairseq is imported
    assert "INFO:fairseq_cli.generate:" in fresh.stderr and "INFO:fairseq" not in fresh.stdout  # its own basicConfig came too late


RANK_SCRIPT = textwrap.dedent("""\
    import os, sys
    rank = os.environ["RANK"]
    print(f"rank {rank}/{os.environ['WORLD_SIZE']} local {os.environ['LOCAL_RANK']} argv {sys.argv[1:]} "
          f"cwd {os.getcwd()} session-leader {os.getsid(0) == os.getpid()} unbuffered {sys.stdout.write_through}")
    print(f"torch-imported {'torch' in sys.modules}", file=sys.stderr)
    sys.exit(int(sys.argv[1]) if rank == "1" else 0)
""")


def torchrun_script(script, *args):
    command = torchrun(2, [])
    return command[:command.index("-m", 2)] + [str(script), *args]  # torchrun runs a script instead of fairseq_cli.train


def test_torchrun_ranks_are_forked_with_torchrun_s_environment_and_exit_status(tmp_path):
    """Under the fork server, torchrun's ranks are forked from the preloaded interpreter (torch is
    already imported where the rank's script begins) and get what torchrun gives a new rank:
    its environment, argv, working directory, a session of their own and ``-u``'s unbuffered
    stdout; a rank's exit status reaches torchrun."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    fresh, forked = run(torchrun_script(script, "0")), run_warm(torchrun_script(script, "0"))
    assert sorted(forked.stdout.splitlines()) == sorted(fresh.stdout.splitlines())
    assert sorted(fresh.stdout.splitlines()) == [
        f"rank {rank}/2 local {rank} argv ['0'] cwd {REPO} session-leader True unbuffered True" for rank in (0, 1)]
    assert "torch-imported False" in fresh.stderr and forked.stderr.count("torch-imported True") == 2
    failed = run_warm(torchrun_script(script, "3"), check=False)
    assert failed.returncode == 1 and "rank      : 1 (local_rank: 1)\n  exitcode  : 3" in failed.stderr
