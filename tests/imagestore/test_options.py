"""``treadmill-imagestore`` options: the settings table and the example file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from treadmill.common.config import ConfigError
from treadmill.imagestore.tap import Options, config_from

EXAMPLE = Path(__file__).parents[2] / "etc" / "treadmill" / "imagestore.toml"


def parse(*args: str) -> dict:
    options = Options()
    options.parseOptions(list(args))
    return options.values


def test_settings_are_declared_once() -> None:
    keys = [s.key for s in Options.all_settings()]
    flags = [s.flag for s in Options.all_settings()]
    assert len(keys) == len(set(keys)) and len(flags) == len(set(flags))


def test_defaults() -> None:
    values = parse("--root", "/srv/store", "--auth-disabled", "true")
    config = config_from(values)
    assert config.listen == ["tcp:8081:interface=127.0.0.1:backlog=1024"]
    assert config.service == "treadmill-imagestore"
    assert config.manifest_max_size == 4 * 1024 * 1024
    assert config.gc_interval == 0 and config.anonymous_pull == []


def test_example_config_parses() -> None:
    values = parse("--config", str(EXAMPLE))
    assert set(values) == {s.key for s in Options.all_settings()}
    assert values["root"] == "/var/lib/treadmill-imagestore"


def test_example_documents_every_setting() -> None:
    text = EXAMPLE.read_text()
    for setting in Options.settings:
        leaf = setting.key.rpartition(".")[2]
        assert re.search(rf"^#?\s*{re.escape(leaf)}\s*=", text, re.MULTILINE), setting.key


def test_example_with_every_commented_setting_enabled(tmp_path: Path) -> None:
    lines = [re.sub(r"^# ([a-z_]+ = .*)$", r"\1", line)
             for line in EXAMPLE.read_text().splitlines()]
    enabled = tmp_path / "imagestore.toml"
    text = "\n".join(lines).replace('anonymous_pull = []\n', "")
    enabled.write_text(text)
    values = parse("--config", str(enabled))
    assert values["anonymous_pull"] == ["demo/*", "public/**"]
    assert values["auth.keys_url"].startswith("https://")
    assert values["metrics.listen"] and values["manhole.listen"]


@pytest.mark.parametrize("args,key", [
    (["--auth-disabled", "true"], "root"),
    (["--root", "/x"], "auth.keys_file"),
    (["--root", "/x", "--auth-keys-file", "/k"], "auth.realm"),
    (["--root", "/x", "--auth-disabled", "true", "--gc-interval", "-5"], "--gc-interval"),
    (["--root", "/x", "--auth-disabled", "true", "--anonymous-pull", "../x y"],
     "--anonymous-pull"),
    (["--root", "/x", "--auth-disabled", "true", "--manifests-max-size", "0"],
     "--manifests-max-size"),
])
def test_errors_name_the_setting(args: list[str], key: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(*args)
    assert isinstance(e.value, ConfigError) and e.value.key == key, e.value


def test_anonymous_pull_from_the_command_line() -> None:
    values = parse("--root", "/x", "--auth-disabled", "true", "--anonymous-pull", "demo/*,a/**")
    assert values["anonymous_pull"] == ["demo/*", "a/**"]
    values = parse("--root", "/x", "--auth-disabled", "true", "--anonymous-pull", "true")
    assert values["anonymous_pull"] == ["**"]
