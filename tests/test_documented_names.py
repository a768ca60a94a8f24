"""Every flag and ``CACHEFS_`` variable the user documentation names works as documented.

The names come from the tables of README.md and docs/*.md (the commands table, the
option tables of the node and the CSI plugin, any table that names one) and from the
prose of README.md's Commands and Configuration sections (the options every command
takes, the environment's naming). Two checks:

- each flag is an option of the CLI parser in its command's context (a flag in a cell
  that names ``cachefs COMMAND`` belongs to that command; elsewhere to the command the
  page describes, or, in README.md's prose, to every command);
- each name is claimed by ``@pytest.mark.exercises(...)`` on a test that runs the CLI as
  a subprocess. tests/conftest.py fails such a test unless a ``cachefs`` process it
  started really had the claimed flag or variable; here the claims are read from
  tests/*.py with ``ast``, so the verdict does not depend on which tests were selected.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cachefs.cli import _parser

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# The command a page describes: its bare flags (a cell without ``cachefs COMMAND``) are its.
PAGE_COMMANDS = {"docs/node.md": "node", "docs/csi.md": "csi"}
# README.md sections whose prose documents options of every command.
README_PROSE = ("Commands", "Configuration")
EVERY_COMMAND = "*"

SPAN = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"cachefs ([a-z]+)\b")
FLAG = re.compile(r"(?:^|(?<=[\s\[(]))(--?[a-z][a-z0-9-]*)")
VARIABLE = re.compile(r"\bCACHEFS_(?:[A-Z0-9]|<[A-Z]+>)(?:[A-Z0-9_]|<[A-Z]+>)*")


@dataclass(frozen=True)
class Mention:
    """A flag or variable as a page names it, with the command it belongs to."""

    name: str
    command: str | None  # None for a variable, or a flag whose command is unknown
    where: str


def _blocks(text: str) -> list[tuple[int, str, str, bool]]:
    """(first line number, section, text, is a table row) of each table row and prose
    paragraph outside code fences: a span may run across a paragraph's lines."""
    blocks: list[tuple[int, str, str, bool]] = []
    section, fenced, paragraph = "", False, None
    for number, line in enumerate(text.splitlines(), 1):
        fence = line.startswith("```")
        fenced ^= fence
        if fenced or fence:
            paragraph = None
        elif line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|"):
            blocks.append((number, section, line, True))
        elif line.strip() and not line.startswith("#"):
            if paragraph is None:
                paragraph = len(blocks)
                blocks.append((number, section, line, False))
            else:
                first, _, joined, _ = blocks[paragraph]
                blocks[paragraph] = (first, section, f"{joined} {line}", False)
            continue
        paragraph = None
    return blocks


def documented() -> list[Mention]:
    """Every flag and variable the documentation's tables (and README's option prose) name."""
    mentions = []
    for page in PAGES:
        relative = page.relative_to(REPO_ROOT).as_posix()
        for number, section, text, table in _blocks(page.read_text()):
            prose = relative == "README.md" and section in README_PROSE and not table
            if not (table or prose):
                continue
            spans = SPAN.findall(text)
            named = [match.group(1) for span in spans if (match := COMMAND.match(span))]
            default = EVERY_COMMAND if prose else (named or [PAGE_COMMANDS.get(relative)])[0]
            for span in spans:
                match = COMMAND.match(span)
                command = match.group(1) if match else default
                where = f"{relative}:{number}"
                mentions += [Mention(flag, command, where) for flag in FLAG.findall(span)]
                mentions += [Mention(name, None, where) for name in VARIABLE.findall(span)]
    return mentions


def claims() -> set[str]:
    """The names ``exercises`` markers in tests/*.py claim."""
    claimed = set()
    for path in sorted((REPO_ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            func = getattr(node, "func", None)
            if not (
                isinstance(func, ast.Attribute)
                and func.attr == "exercises"
                and isinstance(func.value, ast.Attribute)
                and func.value.attr == "mark"
            ):
                continue
            where = f"tests/{path.name}:{node.lineno}"
            for arg in node.args:
                assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), (
                    f"{where}: exercises() takes string literals (read without running tests)"
                )
                claimed.add(arg.value)
    return claimed


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _refusal(command: argparse.ArgumentParser, name: str, flag: str) -> str | None:
    """Why ``cachefs NAME FLAG [VALUE]`` is not accepted, or None when it is."""
    action = command._option_string_actions.get(flag)  # exact: no abbreviations
    if action is None:
        return f"not an option of `cachefs {name}`"
    argv = [name]
    for positional in command._actions:
        if not positional.option_strings and positional.nargs not in ("?", "*"):
            argv.append("s3://bucket/key")
    argv.append(flag)
    if action.nargs != 0:
        argv.append(str(next(iter(action.choices))) if action.choices else "1")
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            _parser().parse_args(argv)
    except SystemExit:
        return f"`cachefs {' '.join(argv)}` is refused: {usage.getvalue().strip()}"
    return None


def test_the_documentation_names_flags_and_variables() -> None:
    mentions = documented()
    flags = {m.name for m in mentions if m.name.startswith("-")}
    variables = {m.name for m in mentions if not m.name.startswith("-")}
    assert flags and variables, "the tables' names were not found: has their form changed?"
    pages = {m.where.split(":")[0] for m in mentions}
    assert {"README.md", *PAGE_COMMANDS} <= pages, pages


def test_every_documented_flag_is_accepted_in_its_commands_context() -> None:
    commands = _commands(_parser())
    problems = []
    for mention in documented():
        if not mention.name.startswith("-"):
            continue
        if mention.command is None:
            problems.append(
                f"{mention.where}: {mention.name} belongs to no command: name `cachefs COMMAND` "
                "in its row, or map the page in PAGE_COMMANDS"
            )
            continue
        if mention.command != EVERY_COMMAND and mention.command not in commands:
            problems.append(f"{mention.where}: no command `cachefs {mention.command}`")
            continue
        names = commands if mention.command == EVERY_COMMAND else [mention.command]
        for name in names:
            refusal = _refusal(commands[name], name, mention.name)
            if refusal:
                problems.append(f"{mention.where}: {mention.name}: {refusal}")
    assert not problems, "\n".join(problems)


def test_every_documented_name_is_exercised_by_a_cli_subprocess_test() -> None:
    claimed = claims()
    missing = defaultdict(list)
    for mention in documented():
        if mention.name not in claimed:
            missing[mention.name].append(mention.where)
    assert not missing, (
        "documented names that no test running the CLI as a subprocess claims with "
        "@pytest.mark.exercises(...):\n"
        + "\n".join(
            f"{name} ({', '.join(dict.fromkeys(where))})" for name, where in sorted(missing.items())
        )
    )
