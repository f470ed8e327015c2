"""The operator's pages (docs/install.md, operations.md, configuration.md) read as an
operator follows them: every ``tml`` command line they show parses with ``tml``'s own
parser, and every ``tml`` command they name in the text exists."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from treadmill.cli.main import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ("install.md", "operations.md", "configuration.md")
SHELL = {">", ">>", "<", "<<<", "|", "&&", "||", ";"}


def _shown(text: str) -> list[list[str]]:
    """The arguments of each ``tml`` command in the page's ``sh`` blocks (continuation
    lines joined, comments and what follows a shell operator left out)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line.strip().removeprefix("$ "), comments=True)
            for i, word in enumerate(words):
                if word == "tml" and (i == 0 or words[i - 1] in SHELL):
                    argv = []
                    for arg in words[i + 1:]:
                        if arg in SHELL or arg.startswith((">", "<")):
                            break
                        argv.append(arg)
                    commands.append(argv)
    return commands


def _leaf(parser: argparse.ArgumentParser, words: list[str]) -> bool:
    """Whether ``words`` begin with a full command path (one with no subcommands left)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        return True
    (action,) = subcommands
    return bool(words) and words[0] in action.choices and _leaf(action.choices[words[0]],
                                                                 words[1:])


@pytest.mark.parametrize("page", PAGES)
def test_the_commands_shown_parse(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    refused = []
    for argv in _shown((DOCS / page).read_text()):
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            refused.append((argv, capsys.readouterr().err.strip().splitlines()[-1:]))
    assert refused == []


@pytest.mark.parametrize("page", PAGES)
def test_the_commands_named_exist(page: str) -> None:
    text = (DOCS / page).read_text()
    named = [shlex.split(span) for span in re.findall(r"`tml ([^`]*)`", text)]
    assert named or _shown(text), page
    assert [words for words in named if not _leaf(build_parser(), words)] == []
