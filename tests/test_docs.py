"""The documentation's links and commands (issue 31: a newcomer follows them as written).

* Every relative link and image in README.md and docs/**/*.md points at a file or folder of the
  repository, and every ``#anchor`` (same page or another page) at one of that page's headings,
  slugged as GitHub does (lower-case, punctuation dropped, spaces to ``-``, ``-1``, ``-2`` ... for
  repeated headings). Links inside code are not links.
* Every command in README.md's ``bash`` blocks that starts with ``fairseq-train``,
  ``fairseq-generate``, ``fairseq-interactive`` (also ``torchrun ... -m fairseq_cli.train``),
  ``python -m taskmoe_fairseq.<tool>`` or ``python examples/...`` names only options the tool
  accepts (also inside a pipeline or list: ``echo ... | python -m taskmoe_fairseq.translate ...``),
  parsed by the tool's own parser: fairseq's ``options.get_training_parser()`` /
  ``get_generation_parser()`` / ``get_interactive_generation_parser()`` with
  ``parse_args_and_arch`` (which loads ``--user-dir``), the plugin's ``parse_args`` /
  ``build_parser``, a script's ``parse_args`` / ``build_parser``. How a command is read:
  continuation lines and quoted strings over several lines joined; comments and redirections
  cut; ``$NAME`` substituted, as the shell does (before words are split), from the block's own
  ``NAME=value`` lines (a variable the block does not set is a failure: the block does not run
  as written); ``$(python -m taskmoe_fairseq.user_dir)`` and a relative
  ``--user-dir taskmoe_fairseq`` (the clone's root) are the plugin's folder; in a synopsis,
  ``[--opt a|b]`` is taken as ``--opt a``, and a placeholder (``<the fairseq-train arguments>``,
  a bare ``...``) stands for those of :data:`PLACEHOLDER_TRAIN_ARGS` (the data, task and model a
  training command names) the command does not give itself.
"""

import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys

import pytest

from cli_helpers import PLUGIN, REPO

README = os.path.join(REPO, "README.md")
DOCS = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
PLACEHOLDER_TRAIN_ARGS = ["DATA", "--user-dir", PLUGIN, "--task", "multilingual_translation_taskmoe",
                          "--lang-pairs", "en-de,de-en", "--langs", "en,de", "--arch", "taskmoe_transformer"]
FAIRSEQ_TOOLS = ("fairseq-train", "fairseq-generate", "fairseq-interactive")


def relative(path):
    return os.path.relpath(path, REPO)


# ---------------------------------------------------------------------------------------- links

FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text):
    """``(line number, line)`` outside fenced code, inline code spans blanked."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        if not inside:
            yield number, re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def slug(heading):
    """GitHub's anchor of a heading's text: markup dropped (link text and code kept), lower-case,
    every character but letters, digits, ``_``, ``-`` and spaces dropped, spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file (repeated headings get ``-1``, ``-2``...), and
    explicit ``<a name|id="...">`` targets."""
    found, seen = set(), {}
    text = open(path, encoding="utf-8").read()
    inside = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not inside:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def link_problems(path):
    problems = []
    text = open(path, encoding="utf-8").read()
    for number, line in prose_lines(text):
        targets = LINK.findall(line) + REFERENCE.findall(line)
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            where = f"{relative(path)}:{number}: {target}"
            destination = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(destination):
                problems.append(f"{where}: no such file or folder")
            elif anchor and destination.endswith(".md") and anchor not in anchors(destination):
                problems.append(f"{where}: no heading with anchor #{anchor} in {relative(destination)}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=relative)
def test_relative_links_and_anchors_resolve(path):
    assert link_problems(path) == []


def test_link_checks_catch_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Set-up: step 1 (`pip`)\n\n## Notes\n\n## Notes\n", encoding="utf-8")
    page.write_text(
        "# Page\n\n[ok](other.md#set-up-step-1-pip) [ok](other.md#notes-1) [ok](#page) [ok](https://example.org/x)\n"
        "[bad](missing.md) [bad](other.md#notes-2) [bad](#nowhere)\n"
        "`[not a link](missing.md)`\n```\n[not a link](missing.md)\n```\n", encoding="utf-8")
    assert [problem.split(": ", 1)[1] for problem in link_problems(str(page))] == [
        "missing.md: no such file or folder",
        "other.md#notes-2: no heading with anchor #notes-2 in " + relative(str(tmp_path / "other.md")),
        "#nowhere: no heading with anchor #nowhere in " + relative(str(page)),
    ]


# ---------------------------------------------------------------------------------------- commands


def bash_blocks(path):
    """``(first line number, lines)`` of every bash/sh/shell fenced block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\w*)", line)
        if fence and current is None:
            if fence.group(1) in ("bash", "sh", "shell"):
                current, start = [], number + 1
            else:
                current, start = False, number + 1  # another language: skipped until its end
        elif fence and current is not None:
            if current is not False:
                blocks.append((start, current))
            current = None
        elif current:
            current.append(line)
        elif current == []:
            current.append(line)
    return blocks


def logical_lines(start, lines):
    """``(line number, text)`` with backslash continuations and quoted strings that span lines joined."""
    joined, number, buffer = [], None, ""
    for offset, line in enumerate(lines):
        if number is None:
            number = start + offset
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        try:
            shlex.split(buffer, comments=True)
        except ValueError:  # an open quote: the string goes on on the next line
            buffer += "\n"
            continue
        joined.append((number, buffer))
        number, buffer = None, ""
    return joined


def _synopsis(text):
    """``[--opt a|b]`` -> ``--opt a``; ``<words>`` placeholders -> one token ``@PLACEHOLDER@``."""
    text = re.sub(r"\[([^\[\]\n]*)\]", lambda m: re.sub(r"(\S+?)\|\S+", r"\1", m.group(1)), text)
    text = re.sub(r"(?<!\S)\.\.\.(?!\S)", " @PLACEHOLDER@ ", text)  # a bare ... : more options
    return re.sub(r"<[A-Za-z][^<>\n]*>", " @PLACEHOLDER@ ", text)


def command_tool(tokens):
    """``(tool, arguments)`` of a checked command, or None."""
    if tokens and tokens[0] in FAIRSEQ_TOOLS:
        return tokens[0], tokens[1:]
    if tokens[:1] == ["torchrun"] and "-m" in tokens and tokens[tokens.index("-m") + 1:][:1] == ["fairseq_cli.train"]:
        return "fairseq-train", tokens[tokens.index("-m") + 2:]
    if tokens[:1] in (["python"], ["python3"]) and len(tokens) > 2 and tokens[1] == "-m" and tokens[2].startswith("taskmoe_fairseq."):
        return tokens[2], tokens[3:]
    if tokens[:1] in (["python"], ["python3"]) and len(tokens) > 1 and tokens[1].startswith("examples/"):
        return tokens[1], tokens[2:]
    return None


def readme_commands(path=README):
    """Every checked command of ``path``'s bash blocks, pipelines and lists split into their
    commands: ``(id, tool, arguments, problems)``."""
    commands = []
    variables = {}  # a reader runs a page's blocks in order, in one shell: assignments carry over
    for start, lines in bash_blocks(path):
        for number, text in logical_lines(start, lines):
            text = text.replace('"$(python -m taskmoe_fairseq.user_dir)"', PLUGIN).replace("$(python -m taskmoe_fairseq.user_dir)", PLUGIN)
            unset = []

            def substitute(match):
                name = match.group(1) or match.group(2)
                if name not in variables:
                    unset.append(f"${name} is not set earlier on this page")
                return variables.get(name, match.group(0))

            text = re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, text)  # as the shell does, before splitting words
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError:
                continue
            assignment = [re.fullmatch(r"([A-Za-z_]\w*)=(.*)", token, re.S) for token in tokens]
            if tokens and all(assignment):
                variables.update(match.groups() for match in assignment)
                continue
            lexer = shlex.shlex(_synopsis(text), posix=True, punctuation_chars="|<>&;")
            lexer.whitespace_split, lexer.commenters = True, "#"
            segment = []
            for token in list(lexer) + [";"]:
                if token and token[0] in "|&;":  # the end of one command of a pipeline or list
                    cut = next((i for i, word in enumerate(segment) if word and word[0] in "<>"), len(segment))
                    words = segment[:cut]
                    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0], re.S):  # VAR=value command
                        words = words[1:]
                    if command_tool(words):
                        tool, args = command_tool(words)
                        commands.append((f"{relative(path)}:{number} {tool}", tool, args, list(unset)))
                    segment = []
                else:
                    segment.append(token)
    return commands


def _fairseq_parse(tool, args):
    from fairseq import options

    args = list(args)
    if "@PLACEHOLDER@" in args:  # the options of PLACEHOLDER_TRAIN_ARGS the command does not give itself
        given = set(args)
        fill = [] if args[0] not in ("@PLACEHOLDER@",) and not args[0].startswith("-") else PLACEHOLDER_TRAIN_ARGS[:1]
        options_ = PLACEHOLDER_TRAIN_ARGS[1:]
        for name, value in zip(options_[::2], options_[1::2]):
            if name not in given:
                fill += [name, value]
        at = args.index("@PLACEHOLDER@")
        args = [arg for arg in args[:at] + fill + args[at + 1:] if arg != "@PLACEHOLDER@"]
    if "--user-dir" in args and args[args.index("--user-dir") + 1] == "taskmoe_fairseq":
        args[args.index("--user-dir") + 1] = PLUGIN  # as from the clone's root
    parser = {"fairseq-train": options.get_training_parser, "fairseq-generate": options.get_generation_parser,
              "fairseq-interactive": options.get_interactive_generation_parser}[tool]()
    options.parse_args_and_arch(parser, args)


def _plugin_parser(tool):
    module = importlib.import_module(tool)
    if hasattr(module, "__path__"):  # a command's package: its options are in its cli.py
        tool = tool + ".cli"
        module = importlib.import_module(tool)
    if hasattr(module, "parse_args"):
        return module.parse_args
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args
    raise AssertionError(f"python -m {tool} has no parse_args or build_parser to check its options with")


def _script_parser(script):
    path = os.path.join(REPO, script)
    if not os.path.isfile(path):
        raise AssertionError(f"{script}: no such script")
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"docs_checked_{os.path.splitext(os.path.basename(path))[0]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if hasattr(module, "parse_args"):
        return module.parse_args
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args
    raise AssertionError(f"{script} has no parse_args or build_parser to check its options with")


def parse_problem(tool, args):
    """None if the tool's own parser accepts ``args``, else its error message."""
    from taskmoe_fairseq.errors import TaskMoeError

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if tool in FAIRSEQ_TOOLS:
                _fairseq_parse(tool, args)
            elif tool.startswith("taskmoe_fairseq."):
                if "@PLACEHOLDER@" in args:
                    return f"{tool} has a placeholder among its own options"
                _plugin_parser(tool)(args)
            else:
                _script_parser(tool)(args)
    except SystemExit as exit:
        if exit.code not in (0, None):
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            return lines[-1] if lines else f"exit {exit.code}"
    except TaskMoeError as error:
        return str(error)
    except Exception as error:  # fairseq's own checks
        if isinstance(error, RuntimeError) and not str(error):
            return "fairseq has no model for this --arch (or the command gives none)"  # its bare RuntimeError()
        return f"{type(error).__name__}: {error}"
    return None


COMMANDS = readme_commands()
# README.md's commands that fail today (issue 31; README.md is being rewritten, not fixed here):
# strict, so each one turns red once it passes, and an entry no command matches any more fails
# test_known_failures_are_current: empty this once the new README passes.
KNOWN_FAILURES = {}  # id -> why: a README command that does not parse yet (strict xfail)


def _command_params():
    for name, tool, args, problems in COMMANDS:
        marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True)] if name in KNOWN_FAILURES else []
        yield pytest.param(tool, args, problems, id=name, marks=marks)


@pytest.mark.parametrize("tool,args,problems", _command_params())
def test_readme_commands_name_only_options_their_tool_accepts(tool, args, problems):
    problem = parse_problem(tool, args)
    assert problems + ([problem] if problem else []) == []


def test_known_failures_are_current():
    assert set(KNOWN_FAILURES) <= {name for name, _, _, _ in COMMANDS}


def test_command_checks_catch_unknown_options_and_unset_variables(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(
        "```bash\nPAIRS=en-de,de-en\nfairseq-train DATA --user-dir taskmoe_fairseq --task multilingual_translation_taskmoe \\\n"
        "    --lang-pairs $PAIRS --arch taskmoe_transformer --moe-expert-count 8 --no-such-option 1 | tee log\n"
        "python -m taskmoe_fairseq.extract --checkpoint c.pt --lang-pair en-de --output o.pt --no-such-flag  # comment\n"
        "python -m taskmoe_fairseq.translate --model m.pt --lang-pair en-de [--beam 4] < in > out\n"
        "python examples/data/binarize.py --raw r --out b --pairs de-fr\n"
        "fairseq-train <data> --moe-expert-count 8 ...   # a synopsis: placeholders stand for the task and model\n"
        "TRAIN=\"--user-dir taskmoe_fairseq --task multilingual_translation_taskmoe --lang-pairs $PAIRS\n"
        "    --arch taskmoe_transformer --optimizer adam --adam-betas (0.9,0.98)\"\n"
        "OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m fairseq_cli.train DATA $TRAIN --max-update 10 &\n"
        "echo 'Hello.' | python -m taskmoe_fairseq.translate --model m.pt --lang-pair en-de --no-such-flag | cat\n"
        "```\n\n```bash\nfairseq-generate DATA --user-dir taskmoe_fairseq --task multilingual_translation_taskmoe --lang-pairs $PAIRS\n"
        "fairseq-generate DATA --user-dir taskmoe_fairseq --task multilingual_translation_taskmoe --lang-pairs $NOPE\n```\n",
        encoding="utf-8")
    commands = readme_commands(str(page))
    assert [(tool, problems) for _, tool, _, problems in commands] == [
        ("fairseq-train", []), ("taskmoe_fairseq.extract", []), ("taskmoe_fairseq.translate", []),
        ("examples/data/binarize.py", []), ("fairseq-train", []), ("fairseq-train", []), ("taskmoe_fairseq.translate", []),
        ("fairseq-generate", []), ("fairseq-generate", ["$NOPE is not set earlier on this page"])]
    assert commands[0][2][-4:] == ["--moe-expert-count", "8", "--no-such-option", "1"]
    assert commands[2][2] == ["--model", "m.pt", "--lang-pair", "en-de", "--beam", "4"]
    found = [parse_problem(tool, args) for _, tool, args, _ in commands]
    assert "unrecognized arguments: --no-such-option 1" in found[0]
    assert "unrecognized arguments: --no-such-flag" in found[1]
    assert found[2:6] == [None, None, None, None] and "--no-such-flag" in found[6] and found[7] is None
    assert commands[7][2][-1] == "en-de,de-en"  # set in the first block, used in the second
    # a quoted value over two lines, $PAIRS expanded in it, split into words where it is used
    assert commands[5][2] == ["DATA", "--user-dir", "taskmoe_fairseq", "--task", "multilingual_translation_taskmoe",
                              "--lang-pairs", "en-de,de-en", "--arch", "taskmoe_transformer", "--optimizer", "adam",
                              "--adam-betas", "(0.9,0.98)",
                              "--max-update", "10"]
    assert parse_problem("fairseq-train", ["DATA", "--moe-expert-count", "8"]) == (
        "fairseq has no model for this --arch (or the command gives none)")
