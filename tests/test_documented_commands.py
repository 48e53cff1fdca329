"""Every ``mim`` and ``synth`` command shown in the README and the guides parses against the real CLI.

Commands are taken from ``bash`` blocks (joined across ``\\``, split at ``&&``, ``;`` and ``|``) and from
inline code spans of three words or more. Parsing goes as far as the CLI goes before running anything:
argparse for ``synth`` (and the run config with its overrides, for configs shipped here), jsonargparse for
``mim``'s own commands, LightningCLI with every ``--config`` file for ``mim fit``; nothing is built.
``python FILE`` and ``pytest FILE`` must name files that exist.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]


def _strip_comment(line: str) -> str:
    """A shell comment starts at a ``#`` that begins a word outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def _split(command_line: str) -> list[list[str]]:
    """Simple commands of one line: words per command, split at ``&&``, ``||``, ``;`` and ``|``."""
    lexer = shlex.shlex(command_line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    return [words for words in commands if words]


def _shell_lines(block: str) -> list[str]:
    """The block's command lines, a quoted string that spans lines (a JSON body for curl) kept in its line."""
    lines, pending = [], ""
    for line in block.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            _split(_strip_comment(pending))
        except ValueError:  # "No closing quotation": the string goes on in the next line
            continue
        lines.append(pending)
        pending = ""
    assert not pending, f"a quote is never closed in: {pending!r}"
    return lines


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        where = document.relative_to(REPO)
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n", " ", block)
            for line in _shell_lines(joined):
                found += [(f"{where}: {line.strip()}", words) for words in _split(_strip_comment(line))]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`]+)`", prose):
            span = " ".join(span.split())  # a span may wrap across lines
            words = span.split()
            if len(words) >= 3 and words[0] in ("mim", "synth"):
                found += [(f"{where}: `{span}`", words) for words in _split(span)]
    return found


def _program(words: list[str]) -> list[str]:
    """The command without environment assignments, and ``torchrun ... -m synth.cli`` as ``synth``."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]
    if words and words[0] == "torchrun" and "-m" in words:
        module = words[words.index("-m") + 1]
        words = [module.split(".")[0], *words[words.index("-m") + 2:]]
    return words


def check_synth(args: list[str]) -> None:
    from synth.cli import build_parser

    parsed = build_parser().parse_args(args)
    config = getattr(parsed, "config", None)
    if config is not None and (REPO / config).is_file():
        from synth.config import load_config

        try:
            load_config(REPO / config, parsed.overrides)
        except ValueError as error:
            if "pip install" not in str(error):  # a config that needs an optional package says so; fine here
                raise


def check_mim(args: list[str]) -> None:
    from jsonargparse import CLI, capture_parser

    from mim.cli import _functions
    from mim.training_cli import LIGHTNING_COMMANDS, lightning_cli

    command, rest = args[0], args[1:]
    if command in LIGHTNING_COMMANDS:
        from omegaconf.errors import OmegaConfBaseException

        try:
            lightning_cli([command, *rest], parse_only=True)
        except OmegaConfBaseException as error:
            if "pip install" not in str(error):  # a config that needs an optional package says so; fine here
                raise
        return
    functions = _functions()
    assert command in functions, f"mim has no command {command!r}"
    from synth.resolvers import register_resolvers

    register_resolvers()
    parser = capture_parser(lambda: CLI(functions[command], args=[], parser_mode="omegaconf"))
    parser.parse_args(rest)


COMMANDS = documented_commands()


def test_the_documents_show_commands() -> None:
    programs = [_program(words)[0] for _, words in COMMANDS if _program(words)]
    assert programs.count("mim") >= 20 and programs.count("synth") >= 10


@pytest.mark.parametrize("where, words", COMMANDS, ids=[where[:90] for where, _ in COMMANDS])
def test_documented_command_parses(where: str, words: list[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # configs and files are named from the repository root
    words = _program(words)
    if not words:
        return
    program, args = words[0], words[1:]
    monkeypatch.setattr(sys, "argv", [program])  # LightningCLI warns when pytest's own arguments are there
    try:
        if program == "synth":
            check_synth(args)
        elif program == "mim":
            check_mim(args)
        elif program in ("python", "python3") and args and args[0].endswith(".py"):
            assert (REPO / args[0]).is_file(), f"{args[0]} does not exist"
        elif program == "pytest" or args[:2] == ["-m", "pytest"]:
            for name in (a for a in args if a.startswith("tests/")):
                assert (REPO / name.split("::")[0]).exists(), f"{name} does not exist"
    except SystemExit as error:
        if error.code == 0:  # a help option (`--model.head.help ...`) prints and exits 0
            return
        pytest.fail(f"{where}\n  does not parse (exit {error.code}); the message is above")
