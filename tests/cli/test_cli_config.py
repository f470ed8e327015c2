"""URL, token and CA file resolution; the configuration file."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from treadmill.cli.config import (
    DEFAULT_URL,
    ConfigError,
    config_path,
    dump_toml,
    load_file,
    resolve,
    save_file,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_path_precedence(tmp_path):
    home = {"HOME": "/home/u"}
    assert config_path(home) == Path("/home/u/.config/treadmill/tml.toml")
    xdg = {**home, "XDG_CONFIG_HOME": "/xdg"}
    assert config_path(xdg) == Path("/xdg/treadmill/tml.toml")
    explicit = {**xdg, "TREADMILL_CONFIG": "/etc/tml.toml"}
    assert config_path(explicit) == Path("/etc/tml.toml")
    assert config_path(explicit, "/flag.toml") == Path("/flag.toml")


def test_defaults_without_anything(tmp_path):
    s = resolve({"HOME": str(tmp_path)})
    assert (s.url, s.token, s.ca_file) == (DEFAULT_URL, None, None)
    assert s.config_path == tmp_path / ".config/treadmill/tml.toml"


@pytest.fixture
def cfg(tmp_path):
    return write(
        tmp_path / "tml.toml",
        'url = "https://sb.example/"\ntoken = "file-token"\nca_file = "/file/ca.pem"\n',
    )


def test_file_supplies_everything(cfg):
    s = resolve({"TREADMILL_CONFIG": str(cfg)})
    assert (s.url, s.token, s.ca_file) == ("https://sb.example", "file-token", "/file/ca.pem")


def test_env_beats_file_and_flags_beat_env(cfg):
    env = {
        "TREADMILL_CONFIG": str(cfg),
        "TREADMILL_URL": "https://env.example",
        "TREADMILL_TOKEN": "env-token",
        "TREADMILL_CA_FILE": "/env/ca.pem",
    }
    s = resolve(env)
    assert (s.url, s.token, s.ca_file) == ("https://env.example", "env-token", "/env/ca.pem")
    s = resolve(env, url="http://flag:1", token="flag-token", ca_file="/flag/ca.pem")
    assert (s.url, s.token, s.ca_file) == ("http://flag:1", "flag-token", "/flag/ca.pem")


def test_file_token_is_not_sent_to_another_url(cfg):
    s = resolve({"TREADMILL_CONFIG": str(cfg)}, url="https://other.example")
    assert s.token is None
    s = resolve({"TREADMILL_CONFIG": str(cfg)}, url="https://sb.example")
    assert s.token == "file-token"


def test_file_token_without_url_applies_to_any_url(tmp_path):
    path = write(tmp_path / "t.toml", 'token = "t"\n')
    assert resolve({}, config=str(path), url="http://x").token == "t"


@pytest.mark.parametrize(
    "text",
    ["url = ", "url = 3\n", 'url = "ftp://x"\n', 'url = "http://x/?q=1"\n', "token = true\n"],
)
def test_invalid_file(tmp_path, text):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        resolve({"TREADMILL_CONFIG": str(path)})


def test_invalid_url_flag(tmp_path):
    with pytest.raises(ConfigError, match="--url"):
        resolve({"HOME": str(tmp_path)}, url="127.0.0.1:8080")


def test_save_file_is_private_atomic_and_round_trips(tmp_path):
    path = tmp_path / "new" / "dir" / "tml.toml"
    data = {"url": "http://x", "token": 'q"uo\\te\n', "other": [1, True], "t": {"k": "v"}}
    save_file(path, data)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert load_file(path) == data
    assert os.listdir(path.parent) == ["tml.toml"]
    save_file(path, {"url": "http://y"})
    assert tomllib.loads(path.read_text()) == {"url": "http://y"}


def test_dump_toml_quotes_odd_keys():
    assert tomllib.loads(dump_toml({"a b": "c", "é": 1.5})) == {"a b": "c", "é": 1.5}
