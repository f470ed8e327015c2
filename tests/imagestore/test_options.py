"""``treadmill-imagestore`` options: the settings table and the example file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from treadmill.common.config import ConfigError
from treadmill.imagestore.tap import Options, config_from

EXAMPLE = Path(__file__).parents[2] / "etc" / "treadmill" / "imagestore.toml"
CACHE_EXAMPLE = Path(__file__).parents[2] / "etc" / "treadmill" / "imagecache.toml"
CACHE_PREFIXES = ("cache.", "replicate.")


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
    assert config.anonymous_pull == []
    # Hygiene by default: hourly garbage collection, abandoned uploads gone within
    # the hour, generous quotas on user namespaces and sessions.
    assert config.gc_interval == 3600 and config.upload_max_age == 3600
    assert config.quota.namespace_bytes == 100 * 1024 ** 3
    assert config.quota.top_level_bytes == 0 and config.quota.namespaces == {}
    assert config.quota.uploads_per_subject == 16


def test_example_config_parses() -> None:
    values = parse("--config", str(EXAMPLE))
    assert set(values) == {s.key for s in Options.all_settings()}
    assert values["root"] == "/var/lib/treadmill-imagestore"


def test_example_documents_every_setting() -> None:
    """imagestore.toml documents the store's settings, imagecache.toml the cache's too."""
    for example, settings in (
            (EXAMPLE, [s for s in Options.settings if not s.key.startswith(CACHE_PREFIXES)]),
            (CACHE_EXAMPLE, Options.settings)):
        text = example.read_text()
        for setting in settings:
            leaf = setting.key.rpartition(".")[2]
            assert re.search(rf"^#?\s*{re.escape(leaf)}\s*=", text, re.MULTILINE), \
                (example.name, setting.key)


def test_cache_example_parses() -> None:
    values = parse("--config", str(CACHE_EXAMPLE))
    config = config_from(values)
    assert config.cache is not None
    assert config.cache.upstreams == ["https://store-1.example:8081",
                                      "https://store-2.example:8081"]
    assert config.cache.max_bytes == 500 * 1024 ** 3
    assert config.cache.upstream.user == "imagecache-site1"
    assert config.cache.replicate_chunk_size == 8 * 1024 * 1024
    # A plain store has no cache.
    assert config_from(parse("--root", "/x", "--auth-disabled", "true")).cache is None


@pytest.mark.parametrize("args,key", [
    (["--cache-enabled", "true"], "cache.upstreams"),
    (["--cache-upstreams", "ftp://x"], "--cache-upstreams"),
    (["--cache-max-bytes", "lots"], "--cache-max-bytes"),
    (["--cache-upstreams", "http://a", "--cache-upstream-user", "u"],
     "cache.upstream_token_file"),
    (["--cache-upstreams", "http://a", "--cache-upstream-user", "u",
      "--cache-upstream-token-file", "/f", "--cache-upstream-token", "t"],
     "cache.upstream_token"),
    (["--replicate-token-file", "/f"], "replicate.user"),
])
def test_cache_errors_name_the_setting(args: list[str], key: str) -> None:
    with pytest.raises(UsageError) as e:
        parse("--root", "/x", "--auth-disabled", "true", *args)
    assert isinstance(e.value, ConfigError) and e.value.key == key, e.value


def test_sizes() -> None:
    from treadmill.imagestore.tap import byte_size

    assert byte_size(1000) == 1000
    assert byte_size("1.5K") == 1536
    assert byte_size("2 GiB") == 2 * 1024 ** 3
    assert byte_size("3t") == 3 * 1024 ** 4
    for bad in ("-1", -1, "1 parsec", True):
        with pytest.raises(ValueError):
            byte_size(bad)


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


def test_quota_settings_from_a_file(tmp_path: Path) -> None:
    config = tmp_path / "imagestore.toml"
    config.write_text('root = "/x"\n[auth]\ndisabled = true\n[quota]\n'
                      'namespace_bytes = "1G"\ntop_level_bytes = 5000\n'
                      'uploads_per_subject = 0\n'
                      '[quota.namespaces]\nalice = "2T"\nci = 0\n')
    quota = config_from(parse("--config", str(config))).quota
    assert quota.namespace_bytes == 1024 ** 3 and quota.top_level_bytes == 5000
    assert quota.namespaces == {"alice": 2 * 1024 ** 4, "ci": 0}
    assert quota.uploads_per_subject == 0
    quota = config_from(parse("--config", str(config), "--quota-namespaces", "bob=1M")).quota
    assert quota.namespaces == {"bob": 1024 ** 2}
    for text, key in (('[quota.namespaces]\n"alice/fw" = 1\n', "quota.namespaces"),
                      ('[quota]\nnamespace_bytes = "lots"\n', "quota.namespace_bytes"),
                      ('[quota]\nuploads_per_subject = -1\n', "quota.uploads_per_subject"),
                      ('[quota]\nsessions = 3\n', "quota.sessions")):
        config.write_text('root = "/x"\n[auth]\ndisabled = true\n' + text)
        with pytest.raises(UsageError) as e:
            parse("--config", str(config))
        assert isinstance(e.value, ConfigError) and e.value.key == key, e.value


def test_an_empty_service_is_refused_like_the_other_satellites() -> None:
    """No token could name an empty audience: the store refuses it at start, as the log
    server and the proxy do (unless auth is disabled, when no token is read)."""
    with pytest.raises(ConfigError) as e:
        parse("--root", "/x", "--auth-keys-file", "/k", "--auth-realm", "http://sb/t",
              "--service", "")
    assert e.value.key == "service" and "must not be empty" in str(e.value)
    assert parse("--root", "/x", "--auth-disabled", "true", "--service", "")["service"] == ""
