"""The operator's pages (docs/install.md, operations.md, configuration.md) read as an
operator follows them: every ``tml`` command line they show parses with ``tml``'s own
parser, every ``tml`` command they name in the text exists, and install.md's layout of
``/opt`` takes its own upgrade."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
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


def test_the_first_install_can_be_upgraded_as_written(tmp_path: Path) -> None:
    """install.md's section 2 lays out ``/opt/treadmill`` so that "Upgrading" step 1 can
    switch it: its environments, links and ``mv -T`` run in a scratch ``/opt`` (an
    environment made as an empty directory; nothing installed)."""
    text = (DOCS / "install.md").read_text()
    section = text[text.index("## 2. "):text.index("## 3. ")]
    upgrading = text[text.index("## Upgrading"):]
    opt = tmp_path / "opt"
    opt.mkdir()
    lines = [line.split("#")[0].strip() for block in re.findall(r"```sh\n(.*?)```", section,
                                                                re.DOTALL)
             for line in block.splitlines()]
    first = [line for line in lines if re.match(r"(python3 -m venv|ln -sfn?) /opt/", line)
             and "/usr/" not in line]
    new = re.findall(r"python3 -m venv (/opt/\S+)", " ".join(upgrading.split()))
    switch = [span for span in re.findall(r"`([^`]*)`", " ".join(upgrading.split()))
              if span.startswith("ln -sfn")]
    assert first and new and len(switch) == 1, (first, new, switch)
    script = "\n".join([*first, f"python3 -m venv {new[0]}", *switch])
    script = re.sub(r"python3 -m venv (\S+)", r"mkdir -p \1/bin", script)
    script = script.replace("/opt/", f"{opt}/")
    done = subprocess.run(["bash", "-euc", script], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, (script, done.stderr)
    assert (opt / "treadmill").is_symlink()
    assert (opt / "treadmill").resolve() == opt / Path(new[0]).name
