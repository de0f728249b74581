"""README.md against the code: the CLI synopsis names exactly the options the parser has.

The synopsis is the first code block under "## Command line". Each line starting with
``diffusionseg`` is one command (continuation lines are indented); the words after ``diffusionseg``
that name subcommands select the parser, every ``-x``/``--xyz`` on the line must be an option of
that parser, and every option of every parser must appear on one of its lines.
"""

from __future__ import annotations

import argparse
import re

import pytest

from DiffusionSegLib.cli.main import build_parser

from helpers import REPO  # noqa: E402

README = REPO / "README.md"
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def synopsis_block(text: str) -> list[str]:
    """The lines of the first fenced code block after the "## Command line" heading."""
    section = text.split("\n## Command line\n", 1)[1]
    block = section.split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


def synopsis_commands(lines: list[str]) -> list[str]:
    """One string per command: continuation lines joined to their command; # comments dropped."""
    commands: list[str] = []
    for line in lines:
        line = line.split("#", 1)[0].rstrip()
        if line.startswith("diffusionseg"):
            commands.append(line)
        else:
            assert commands, f"a continuation line before any command: {line!r}"
            commands[-1] += " " + line.strip()
    return commands


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parser_for(words: list[str]) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    """Follow the subcommand words of a synopsis line from the top-level parser."""
    parser, path = build_parser(), ()
    for word in words:
        children = subparsers(parser)
        if word not in children:
            break
        parser, path = children[word], (*path, word)
    return path, parser


def options_of(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """Option strings of each optional argument (help excluded)."""
    return [tuple(a.option_strings) for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for name, child in subparsers(parser).items():
        yield from all_parsers(child, (*path, name))


@pytest.fixture(scope="module")
def named() -> dict[tuple[str, ...], set[str]]:
    """Command path -> options the synopsis names for it."""
    found: dict[tuple[str, ...], set[str]] = {}
    for command in synopsis_commands(synopsis_block(README.read_text(encoding="utf-8"))):
        words = command.split()[1:]
        path, _ = parser_for(words)
        found.setdefault(path, set()).update(OPTION.findall(command))
    return found


def test_the_synopsis_is_found_and_covers_every_command(named):
    every = {path for path, _ in all_parsers(build_parser())}
    assert set(named) == every, f"commands missing from the synopsis: {sorted(every - set(named))}"


def test_every_option_in_the_synopsis_exists_in_the_parser(named):
    for path, options in named.items():
        _, parser = parser_for(list(path))
        known = {s for strings in options_of(parser) for s in strings}
        unknown = sorted(options - known)
        assert not unknown, f"README names options that 'diffusionseg {' '.join(path)}' does not have: {unknown}"


def test_every_parser_option_appears_in_the_synopsis(named):
    for path, parser in all_parsers(build_parser()):
        missing = [strings for strings in options_of(parser) if not set(strings) & named.get(path, set())]
        assert not missing, f"'diffusionseg {' '.join(path)}' options missing from the README synopsis: {missing}"


def test_the_check_catches_a_stale_synopsis():
    """The parsing above must see a wrong option and a missing one (or these tests prove nothing)."""
    stale = synopsis_commands(["diffusionseg segment INPUT -o OUT [--samples N] [--no-such-option]"])
    path, parser = parser_for(stale[0].split()[1:])
    assert path == ("segment",)
    named = set(OPTION.findall(stale[0]))
    known = {s for strings in options_of(parser) for s in strings}
    assert named - known == {"--no-such-option"}
    assert ("--strict",) in [s for s in options_of(parser) if not set(s) & named]
