"""docs/cli.md documents every command and option of the parser."""

from __future__ import annotations

import re
from pathlib import Path

from tests.cli.support import commands
from treadmill.cli.main import build_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
GLOBAL = {"-h", "--help", "--url", "--token", "--token-file", "--ca-file", "--config", "--json"}


def sections() -> dict[str, str]:
    """``### `tml …` `` headings (several commands may share one) → their text."""
    text = DOC.read_text()
    found: dict[str, str] = {}
    parts = re.split(r"^###? ", text, flags=re.M)
    for part in parts:
        heading, _, body = part.partition("\n")
        for command in re.findall(r"`(tml [^`]*)`", heading):
            words = [w for w in command.split()[1:] if re.fullmatch(r"[a-z][a-z-]*", w)]
            found.setdefault(" ".join(words), "")
            found[" ".join(words)] += heading + "\n" + body
    return found


def test_every_command_and_option_is_documented() -> None:
    documented = sections()
    missing = []
    for path, parser in commands(build_parser()):
        name = " ".join(path)
        section = next((body for heading, body in documented.items()
                        if heading == name or heading.startswith(name + " ")), None)
        if section is None:
            missing.append(f"tml {name}: no ### `tml {name} …` section")
            continue
        for action in parser._actions:
            for option in action.option_strings:
                if option not in GLOBAL and not re.search(
                        rf"(?<![\w-]){re.escape(option)}(?![\w-])", section):
                    missing.append(f"tml {name}: option {option}")
    assert not missing, "docs/cli.md misses:\n" + "\n".join(missing)


def test_global_options_and_exit_statuses_are_documented() -> None:
    text = DOC.read_text()
    for option in GLOBAL - {"-h", "--help"}:
        assert f"`{option}" in text, option
    for status in ("0", "1", "2", "3", "4", "5", "6", "130", "143"):
        assert re.search(rf"^\| `?{status}`? \|", text, re.M), f"exit status {status}"


def test_shown_secrets_have_the_prefixes_the_switchboard_issues() -> None:
    """Every ``token:`` line of an example starts as real secrets do (``tmu_`` for users,
    ``tmh_`` for hosts), so a reader's secret scanner matches what the page shows."""
    from treadmill.switchboard.credentials import HOST_TOKEN_PREFIX, USER_TOKEN_PREFIX

    shown = re.findall(r"^token:\s+(tm\S*)", DOC.read_text(), re.M)
    assert shown
    wrong = [t for t in shown if not t.startswith((USER_TOKEN_PREFIX, HOST_TOKEN_PREFIX))]
    assert not wrong, f"docs/cli.md shows tokens no switchboard issues: {wrong}"
