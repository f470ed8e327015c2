"""Role configuration: TOML file, command-line overrides, checks and messages."""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from pathlib import Path

import pytest
from twisted.application import app
from twisted.internet import endpoints
from twisted.python import usage
from twisted.python.systemd import ListenFDs

from treadmill.common.config import (
    BOOL,
    FIELD,
    FLOAT,
    INT,
    STR,
    STRLIST,
    ConfigError,
    RoleOptions,
    Row,
    Setting,
    _field_default,
    build,
    client_endpoint,
    one_of,
    positive,
    resolve_defaults,
    server_endpoints,
    table,
)


class ExampleOptions(RoleOptions):
    """A small role with settings of each kind."""

    settings = (
        Setting("listen", server_endpoints, ["tcp:8080:interface=127.0.0.1"], "API listeners."),
        Setting("upstream.endpoint", client_endpoint, None, "Where to connect."),
        Setting("database.dsn", STR, None, "libpq connection string.", required=True),
        Setting("database.pool_size", positive(INT), 4, "Connections in the pool."),
        Setting("jobs.timeout", positive(FLOAT), 60.0, "Seconds."),
        Setting("jobs.grace", FLOAT, 0.5, "Seconds; may be zero."),
        Setting("debug.enabled", BOOL, False, "Debug mode."),
        Setting("mode", one_of("fast", "safe"), "safe", "How to run."),
        Setting("tags.allowed", STRLIST, [], "Allowed tags."),
    )


DSN = ["--database-dsn", "dbname=test"]

DEFAULTS = {
    "manhole.listen": [],
    "manhole.authorized_keys": None,
    "manhole.host_key": None,
    "metrics.listen": [],
    "metrics.allow_remote": False,
    "http.head_timeout": 10.0,
    "http.idle_timeout": 60.0,
    "listen": ["tcp:8080:interface=127.0.0.1"],
    "upstream.endpoint": None,
    "database.dsn": "dbname=test",
    "database.pool_size": 4,
    "jobs.timeout": 60.0,
    "jobs.grace": 0.5,
    "debug.enabled": False,
    "mode": "safe",
    "tags.allowed": [],
}


def parse(*args: str, options_class: type[RoleOptions] = ExampleOptions) -> dict:
    options = options_class()
    options.parseOptions(list(args))
    return options.values


@pytest.fixture
def config(tmp_path: Path):
    """Write a TOML file and return its path (as a string)."""

    def write(text: str | bytes, name: str = "role.toml") -> str:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def error(*args: str, options_class: type[RoleOptions] = ExampleOptions) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(*args, options_class=options_class)
    return info.value


# -- flags ---------------------------------------------------------------------


def test_flags_derive_from_dotted_keys():
    flags = {setting.key: setting.flag for setting in ExampleOptions.all_settings()}
    assert flags["database.dsn"] == "database-dsn"
    assert flags["database.pool_size"] == "database-pool-size"
    assert flags["manhole.authorized_keys"] == "manhole-authorized-keys"
    assert flags["listen"] == "listen"
    names = [param[0] for param in ExampleOptions.optParameters]
    assert names == ["config", *flags.values()]


def test_help_shows_defaults():
    helps = {param[0]: param[3] for param in ExampleOptions.optParameters}
    assert helps["database-pool-size"] == "Connections in the pool. [default: 4]"
    assert helps["listen"] == "API listeners. [default: tcp:8080:interface=127.0.0.1]"
    assert helps["config"].startswith("TOML configuration file")
    text = str(ExampleOptions())
    assert "--database-pool-size=" in text
    assert "--config=" in text


# -- sources -------------------------------------------------------------------


def test_defaults():
    assert parse(*DSN) == DEFAULTS


def test_default_lists_are_not_shared():
    parse(*DSN)["tags.allowed"].append("mutated")
    assert parse(*DSN)["tags.allowed"] == []
    assert ExampleOptions.settings[-1].default == []


def test_file_values(config):
    path = config("""
        listen = ["tcp:9000:interface=127.0.0.1", "unix:/run/example.sock"]
        mode = "fast"

        [upstream]
        endpoint = "tcp:host=example.org:port=80"

        [database]
        dsn = "host=/run/postgresql dbname=treadmill"
        pool_size = 8

        [jobs]
        timeout = 90          # an integer where a number is expected
        grace = 0.0

        [debug]
        enabled = true

        [tags]
        allowed = ["arch=x86_64", "qemu"]

        [metrics]
        listen = "tcp:9101:interface=127.0.0.1"   # one endpoint, not an array
    """)
    assert parse("--config", path) == {
        **DEFAULTS,
        "listen": ["tcp:9000:interface=127.0.0.1", "unix:/run/example.sock"],
        "mode": "fast",
        "upstream.endpoint": "tcp:host=example.org:port=80",
        "database.dsn": "host=/run/postgresql dbname=treadmill",
        "database.pool_size": 8,
        "jobs.timeout": 90.0,
        "jobs.grace": 0.0,
        "debug.enabled": True,
        "tags.allowed": ["arch=x86_64", "qemu"],
        "metrics.listen": ["tcp:9101:interface=127.0.0.1"],
    }


def test_dotted_keys_in_file(config):
    path = config('database.dsn = "dbname=dotted"\njobs.timeout = 5.5\n')
    values = parse("-c", path)
    assert values["database.dsn"] == "dbname=dotted"
    assert values["jobs.timeout"] == 5.5


def test_command_line_overrides_file(config):
    path = config("""
        mode = "fast"
        [database]
        dsn = "dbname=from_file"
        pool_size = 8
        [tags]
        allowed = ["a", "b"]
        [debug]
        enabled = true
    """)
    values = parse("--config", path, "--database-dsn", "dbname=from_cli",
                   "--database-pool-size", "2", "--tags-allowed", "c",
                   "--debug-enabled", "off", "--listen", "unix:/run/cli.sock")
    assert values == {
        **DEFAULTS,
        "mode": "fast",  # from the file, not overridden
        "database.dsn": "dbname=from_cli",
        "database.pool_size": 2,
        "tags.allowed": ["c"],
        "debug.enabled": False,
        "listen": ["unix:/run/cli.sock"],
    }


@pytest.mark.parametrize(("given", "expected"), [
    ("a,b", ["a", "b"]),
    (" a , b ,, c ", ["a", "b", "c"]),
    ("single", ["single"]),
    ("", []),
])
def test_list_from_command_line(given, expected):
    assert parse(*DSN, "--tags-allowed", given)["tags.allowed"] == expected


def test_endpoint_list_from_command_line_is_one_endpoint():
    """An endpoint list on the command line takes one endpoint (descriptions may hold commas)."""
    values = parse(*DSN, "--metrics-listen", "tcp:9101:interface=127.0.0.1")
    assert values["metrics.listen"] == ["tcp:9101:interface=127.0.0.1"]


@pytest.mark.parametrize(("given", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("no", False), ("Off", False),
])
def test_bool_from_command_line(given, expected):
    assert parse(*DSN, "--debug-enabled", given)["debug.enabled"] is expected


# -- errors in the file ------------------------------------------------------------


def test_unknown_key(config):
    path = config('[database]\ndsn = "x"\npool_sise = 3\n')
    e = error("--config", path)
    assert str(e) == f"{path}: database.pool_sise: unknown setting"
    assert (e.source, e.key, e.problem) == (path, "database.pool_sise", "unknown setting")


def test_unknown_table(config):
    path = config('[databse]\ndsn = "x"\n')
    assert str(error("--config", path)) == f"{path}: databse.dsn: unknown setting"


def test_table_where_a_value_belongs(config):
    path = config('[mode]\nfast = true\n')
    assert str(error("--config", path)) == f"{path}: mode.fast: unknown setting"


@pytest.mark.parametrize(("toml", "key", "problem"), [
    ('database.pool_size = "four"', "database.pool_size", "expected an integer, got 'four'"),
    ("database.pool_size = true", "database.pool_size", "expected an integer, got a boolean"),
    ("database.pool_size = 2.5", "database.pool_size", "expected an integer, got float"),
    ("database.dsn = 42", "database.dsn", "expected a string, got int"),
    ('jobs.timeout = "soon"', "jobs.timeout", "expected a number, got 'soon'"),
    ('jobs.timeout = [1]', "jobs.timeout", "expected a number, got list"),
    ('debug.enabled = "maybe"', "debug.enabled", "expected a boolean, got 'maybe'"),
    ("tags.allowed = [1, 2]", "tags.allowed", "expected a list of strings"),
    ("tags.allowed = 3", "tags.allowed", "expected a list of strings"),
    ("listen = 8080", "listen", "expected an endpoint or a list of endpoints"),
    ("mode = 3", "mode", "expected a string, got int"),
])
def test_wrong_type(config, toml, key, problem):
    path = config(f'database.dsn = "x"\n{toml}\n' if key != "database.dsn" else toml + "\n")
    e = error("--config", path)
    assert str(e) == f"{path}: {key}: {problem}"
    assert (e.source, e.key, e.problem) == (path, key, problem)


def test_invalid_toml(config):
    path = config('[database\ndsn = "x"\n')
    e = error("--config", path)
    assert str(e).startswith(f"{path}: invalid TOML: ")
    assert e.key is None
    assert "line 1" in str(e)


def test_duplicate_key_is_invalid_toml(config):
    path = config('mode = "fast"\nmode = "safe"\n')
    assert str(error("--config", path)).startswith(f"{path}: invalid TOML: ")


def test_file_not_utf8(config):
    path = config(b'database.dsn = "caf\xe9"\n')
    assert str(error("--config", path)).startswith(f"{path}: ")


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    e = error("--config", path, *DSN)
    assert str(e) == f"{path}: file not found"


def test_unreadable_file(tmp_path):
    e = error("--config", str(tmp_path), *DSN)  # a directory
    assert str(e).startswith(f"{tmp_path}: cannot read: ")


def test_file_checked_even_when_overridden(config):
    """A bad value in the file is an error even if the command line overrides it."""
    path = config('database.dsn = "x"\ndatabase.pool_size = "many"\n')
    e = error("--config", path, "--database-pool-size", "3")
    assert e.source == path and e.key == "database.pool_size"


# -- errors on the command line ----------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--database-pool-size", "four"],
     "--database-pool-size: expected an integer, got 'four'"),
    (["--jobs-timeout", "soon"], "--jobs-timeout: expected a number, got 'soon'"),
    (["--debug-enabled", "maybe"], "--debug-enabled: expected a boolean, got 'maybe'"),
    (["--mode", "slow"], "--mode: expected one of fast, safe, got 'slow'"),
    (["--database-pool-size", "0"], "--database-pool-size: expected a positive number, got 0"),
])
def test_command_line_errors(args, message):
    assert str(error(*DSN, *args)) == message


def test_unknown_flag_is_usage_error():
    with pytest.raises(usage.UsageError, match="database-dns"):
        parse("--database-dns", "x")


# -- required ------------------------------------------------------------------


def test_required_missing_on_command_line():
    e = error()
    assert str(e) == "command line: database.dsn: required setting is missing"


def test_required_missing_in_file(config):
    path = config("mode = \"fast\"\n")
    assert str(error("--config", path)) == f"{path}: database.dsn: required setting is missing"


def test_required_empty(config):
    path = config('database.dsn = ""\n')
    assert str(error("--config", path)) == f"{path}: database.dsn: required setting is missing"
    assert str(error("--database-dsn", "")) \
        == "command line: database.dsn: required setting is missing"


def test_required_from_command_line_with_file(config):
    path = config("mode = \"fast\"\n")
    assert parse("--config", path, *DSN)["database.dsn"] == "dbname=test"


# -- kinds -----------------------------------------------------------------------


@pytest.mark.parametrize("desc", [
    "tcp:notaport",
    "tcp:8080:interface=::1",  # an unescaped colon
    "nosuchtype:8080",
    "",
])
def test_invalid_listening_endpoint(config, desc):
    path = config(f'database.dsn = "x"\nlisten = [{desc!r}]\n'.replace("'", '"'))
    e = error("--config", path)
    assert e.source == path and e.key == "listen"
    assert e.problem.startswith(f"invalid listening endpoint {desc!r}")
    e = error(*DSN, "--listen", desc)
    assert e.key == "--listen"
    assert e.problem.startswith(f"invalid listening endpoint {desc!r}")


@pytest.fixture
def socket_activated(monkeypatch):
    """Pretend systemd passed this process one listening socket."""
    monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon", ListenFDs([3]))


@pytest.mark.parametrize("desc", [
    "tcp:8080",
    "tcp:0:interface=127.0.0.1",
    "tcp6:8080:interface=\\:\\:1",
    "unix:/run/treadmill/api.sock:mode=660",
    "systemd:domain=INET:index=0",
])
def test_valid_listening_endpoint(socket_activated, desc):
    assert parse(*DSN, "--listen", desc)["listen"] == [desc]


def test_systemd_endpoint_without_socket_activation():
    """Outside socket activation there is no inherited socket: refused at start."""
    e = error(*DSN, "--listen", "systemd:domain=INET:index=0")
    assert e.key == "--listen"
    assert e.problem.startswith("invalid listening endpoint 'systemd:domain=INET:index=0'")


def test_invalid_client_endpoint():
    e = error(*DSN, "--upstream-endpoint", "tcp:host=example.org:port=http")
    assert e.key == "--upstream-endpoint"
    assert e.problem.startswith("invalid client endpoint ")


def test_one_of(config):
    assert parse(*DSN, "--mode", "fast")["mode"] == "fast"
    path = config('database.dsn = "x"\nmode = "Fast"\n')
    assert str(error("--config", path)) \
        == f"{path}: mode: expected one of fast, safe, got 'Fast'"


def test_one_of_name():
    assert one_of("a", "b").__name__ == "one of a|b"


@pytest.mark.parametrize(("toml", "problem"), [
    ("database.pool_size = 0", "expected a positive number, got 0"),
    ("database.pool_size = -3", "expected a positive number, got -3"),
    ("jobs.timeout = 0.0", "expected a positive number, got 0.0"),
    ("jobs.timeout = -0.5", "expected a positive number, got -0.5"),
])
def test_positive(config, toml, problem):
    path = config(f'database.dsn = "x"\n{toml}\n')
    key = toml.partition(" ")[0]
    assert str(error("--config", path)) == f"{path}: {key}: {problem}"


def test_positive_accepts_small_values():
    values = parse(*DSN, "--database-pool-size", "1", "--jobs-timeout", "0.001")
    assert values["database.pool_size"] == 1
    assert values["jobs.timeout"] == 0.001


def test_non_positive_setting_accepts_zero_and_negative():
    assert parse(*DSN, "--jobs-grace", "0")["jobs.grace"] == 0.0
    assert parse(*DSN, "--jobs-grace", "-1")["jobs.grace"] == -1.0


@pytest.mark.parametrize("source", ["file", "command line"])
def test_positive_refuses_nan(config, source):
    if source == "file":
        path = config('database.dsn = "x"\njobs.timeout = nan\n')
        error("--config", path)
    else:
        error(*DSN, "--jobs-timeout", "nan")


# -- manhole rules ---------------------------------------------------------------

MANHOLE_FILES = ["--manhole-authorized-keys", "/etc/keys", "--manhole-host-key", "/var/hostkey"]


def test_manhole_needs_authorized_keys():
    e = error(*DSN, "--manhole-listen", "unix:/run/manhole.sock",
              "--manhole-host-key", "/var/hostkey")
    assert e.key == "manhole.authorized_keys"
    assert str(e) == ("command line: manhole.authorized_keys: "
                      "manhole.listen is set but manhole.authorized_keys is not")


def test_manhole_needs_host_key(config):
    path = config("""
        database.dsn = "x"
        [manhole]
        listen = ["unix:/run/manhole.sock"]
        authorized_keys = "/etc/keys"
    """)
    e = error("--config", path)
    assert (e.source, e.key) == (path, "manhole.host_key")
    assert "manhole.host_key" in e.problem


@pytest.mark.parametrize("desc", [
    "tcp:2222",  # every interface
    "tcp:2222:interface=0.0.0.0",
    "tcp:2222:interface=192.0.2.10",
    "tcp6:2222:interface=\\:\\:",
    "tcp:port=2222",
    "systemd:domain=INET:index=0",
])
def test_manhole_refuses_non_loopback(socket_activated, desc):
    e = error(*DSN, *MANHOLE_FILES, "--manhole-listen", desc)
    assert e.key == "manhole.listen"
    assert e.problem == f"manhole listener {desc!r} must be a UNIX socket or bound to loopback"


def test_manhole_refuses_non_loopback_among_others(config):
    path = config("""
        database.dsn = "x"
        [manhole]
        listen = ["unix:/run/manhole.sock", "tcp:2222:interface=10.0.0.1"]
        authorized_keys = "/etc/keys"
        host_key = "/var/hostkey"
    """)
    e = error("--config", path)
    assert (e.source, e.key) == (path, "manhole.listen")
    assert "tcp:2222:interface=10.0.0.1" in e.problem


@pytest.mark.parametrize("desc", [
    "unix:/run/treadmill/manhole.sock",
    "unix:/run/treadmill/manhole.sock:mode=600",
    "tcp:2222:interface=127.0.0.1",
    "tcp:interface=127.0.0.1:port=2222",
    "tcp:2222:interface=127.0.0.2",
])
def test_manhole_accepts_local(desc):
    values = parse(*DSN, *MANHOLE_FILES, "--manhole-listen", desc)
    assert values["manhole.listen"] == [desc]
    assert values["manhole.authorized_keys"] == "/etc/keys"
    assert values["manhole.host_key"] == "/var/hostkey"


def test_manhole_accepts_ipv6_loopback():
    desc = "tcp6:2222:interface=\\:\\:1"
    assert parse(*DSN, *MANHOLE_FILES, "--manhole-listen", desc)["manhole.listen"] == [desc]


def test_manhole_off_by_default_needs_nothing():
    values = parse(*DSN)
    assert values["manhole.listen"] == []


# -- twistd ----------------------------------------------------------------------


def test_config_error_is_usage_error():
    assert issubclass(ConfigError, usage.UsageError)


class TwistdLikeOptions(usage.Options):
    """Like twistd's ServerOptions: the role's options are a subcommand."""

    subCommands = [["example-role", None, ExampleOptions, "An example role."]]


def test_twistd_style_parsing_raises_usage_error(tmp_path):
    options = TwistdLikeOptions()
    with pytest.raises(usage.UsageError) as info:
        options.parseOptions(["example-role", "--config", str(tmp_path / "absent.toml")])
    assert isinstance(info.value, ConfigError)


def test_twistd_exits_non_zero(config, monkeypatch, capsys):
    path = config('database.dsn = "x"\nmode = "slow"\n')
    monkeypatch.setattr("sys.argv", ["twistd", "example-role", "--config", path])
    ran = []
    with pytest.raises(SystemExit) as info:
        app.run(ran.append, TwistdLikeOptions)
    assert info.value.code == 1
    assert ran == []
    assert f"{path}: mode: expected one of fast, safe, got 'slow'" in capsys.readouterr().out


def test_twistd_parses_valid_config(config, monkeypatch):
    path = config('database.dsn = "x"\n')
    monkeypatch.setattr("sys.argv", ["twistd", "example-role", "--config", path])
    ran = []
    app.run(ran.append, TwistdLikeOptions)
    [options] = ran
    assert options.subOptions.values["database.dsn"] == "x"


# -- the switchboard's options -------------------------------------------------------

EXAMPLES = Path(__file__).parents[2] / "etc" / "treadmill"
SWITCHBOARD_EXAMPLE = EXAMPLES / "switchboard.toml"


def _switchboard_options():
    from treadmill.switchboard.tap import Options

    return Options


def test_switchboard_requires_dsn():
    Options = _switchboard_options()
    e = error("--capabilities-signing-key", "/tmp/key.pem", options_class=Options)
    assert e.key == "database.dsn"
    assert e.problem == "required setting is missing"


def test_switchboard_requires_dsn_in_file(config):
    Options = _switchboard_options()
    path = config('capabilities.signing_key = "/tmp/key.pem"\n')
    e = error("--config", path, options_class=Options)
    assert (e.source, e.key) == (path, "database.dsn")


def test_switchboard_settings_are_declared_once():
    Options = _switchboard_options()
    keys = [setting.key for setting in Options.all_settings()]
    assert len(keys) == len(set(keys))
    flags = [setting.flag for setting in Options.all_settings()]
    assert len(flags) == len(set(flags))
    assert "database.dsn" in keys


@pytest.mark.skipif(not SWITCHBOARD_EXAMPLE.exists(), reason="no etc/treadmill/switchboard.toml")
def test_switchboard_example_config_parses():
    Options = _switchboard_options()
    path = str(SWITCHBOARD_EXAMPLE)
    # The command line supplies the required settings in case the example
    # leaves them commented out.
    values = parse("--config", path, "--database-dsn", "dbname=override",
                   "--capabilities-signing-key", "/tmp/key.pem", options_class=Options)
    assert values["database.dsn"] == "dbname=override"
    assert set(values) == {setting.key for setting in Options.all_settings()}


def _shown_keys(text: str) -> set[str]:
    """The dotted keys an example file sets or shows commented out (``# key = value``),
    in the tables (``[a.b]``, ``# [a.b]``) they stand in, and the tables themselves."""
    table, keys = "", set()
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if m := re.fullmatch(r"\[([\w.]+)\]", line):
            table = m[1] + "."
            keys.add(m[1])
        elif m := re.match(r"([\w.]+)\s*=", line):
            keys.add(table + m[1])
    return keys


def _example_of(role: str, key: str) -> str:
    """The file of ``etc/treadmill/`` that shows ``key`` of ``role``: a supervisor's driver
    settings in that driver's example, the others in ``supervisor-mock.toml`` (which the
    other two name for "the keys every supervisor has"); an image cache's in its own."""
    table = key.partition(".")[0]
    if role == "supervisor":
        return f"supervisor-{table if table in ('qemu', 'serial') else 'mock'}.toml"
    if role == "imagestore":
        return "imagecache.toml" if table in ("cache", "replicate") else "imagestore.toml"
    return f"{role}.toml"


@pytest.mark.skipif(not SWITCHBOARD_EXAMPLE.exists(), reason="no etc/treadmill/switchboard.toml")
def test_switchboard_example_without_dsn_is_refused(tmp_path):
    """The same file with its dsn line removed names the file and the key."""
    Options = _switchboard_options()
    lines = SWITCHBOARD_EXAMPLE.read_text().splitlines(keepends=True)
    stripped = tmp_path / "switchboard.toml"
    stripped.write_text("".join(line for line in lines
                                if not re.match(r"\s*dsn\s*=", line)))
    e = error("--config", str(stripped), "--capabilities-signing-key", "/tmp/key.pem",
              options_class=Options)
    assert (e.source, e.key) == (str(stripped), "database.dsn")
    assert os.fspath(stripped) in str(e)


@pytest.mark.parametrize("args", [
    ["--jobs-max-timeout", "600"],
    ["--jobs-default-queue-timeout", "90000", "--jobs-max-queue-timeout", "3600"],
    ["--jobs-max-timeout", str(8 * 24 * 3600)],  # longer than a log write token can live
])
def test_switchboard_default_above_max_is_refused(args):
    Options = _switchboard_options()
    error("--database-dsn", "dbname=x", "--capabilities-signing-key", "/tmp/key.pem", *args,
          options_class=Options)


def test_table_setting_keeps_free_form_keys(tmp_path):
    from treadmill.common.config import RoleOptions, Setting, load_file

    def mapping(value):
        if not isinstance(value, dict):
            raise ValueError("expected a table")
        return dict(value)

    settings = (Setting("ports", mapping, {}, "a table", table=True),)
    path = tmp_path / "t.toml"
    path.write_text('[ports]\n"job-1/ssh" = 22\n"a.b" = 3\n')
    assert load_file(str(path), settings) == {"ports": {"job-1/ssh": 22, "a.b": 3}}

    class Opts(RoleOptions):
        settings = (Setting("ports", mapping, {}, "a table", table=True),)

    first, second = Opts(), Opts()
    first.parseOptions([])
    second.parseOptions([])
    first.values["ports"]["x"] = 1
    assert second.values["ports"] == {}  # Defaults are copied, never shared.


# -- metrics listeners and HTTP limits (security issue 12) -------------------------------


@pytest.mark.parametrize("desc", [
    "tcp:9101",  # every interface
    "tcp:9101:interface=0.0.0.0",
    "tcp:9101:interface=192.0.2.10",
    "tcp6:9101:interface=\\:\\:",
    "systemd:domain=INET:index=0",
])
def test_metrics_refuses_non_loopback_without_opt_in(socket_activated, desc):
    e = error(*DSN, "--metrics-listen", desc)
    assert e.key == "metrics.listen"
    assert repr(desc) in e.problem and "metrics.allow_remote" in e.problem
    values = parse(*DSN, "--metrics-listen", desc, "--metrics-allow-remote", "true")
    assert values["metrics.listen"] == [desc]


def test_metrics_opt_in_from_the_file(config):
    path = config("""
        database.dsn = "x"
        [metrics]
        listen = ["unix:/run/metrics.sock", "tcp:9101:interface=10.0.0.1"]
    """)
    assert error("--config", path).key == "metrics.listen"
    path = config("""
        database.dsn = "x"
        [metrics]
        listen = ["unix:/run/metrics.sock", "tcp:9101:interface=10.0.0.1"]
        allow_remote = true
    """)
    assert parse("--config", path)["metrics.allow_remote"] is True


@pytest.mark.parametrize("desc", ["unix:/run/metrics.sock", "tcp:9101:interface=127.0.0.1",
                                  "tcp6:9101:interface=\\:\\:1"])
def test_metrics_on_loopback_needs_no_opt_in(desc):
    assert parse(*DSN, "--metrics-listen", desc)["metrics.listen"] == [desc]


def test_http_limits(config):
    values = parse(*DSN, "--http-head-timeout", "2.5", "--http-idle-timeout", "0")
    assert (values["http.head_timeout"], values["http.idle_timeout"]) == (2.5, 0.0)
    assert error(*DSN, "--http-head-timeout", "-1").key == "--http-head-timeout"
    assert error(*DSN, "--http-idle-timeout", "nan").key == "--http-idle-timeout"


# -- the config dataclass a settings table fills ------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pool:
    size: int = 4
    timeout: float = 10.0


@dataclasses.dataclass
class _Config:
    dsn: str
    pool: _Pool = dataclasses.field(default_factory=_Pool)
    cache: _Pool | None = None
    name: str = dataclasses.field(default_factory=lambda: "generated")
    auth: dict = dataclasses.field(default_factory=dict)
    urls: tuple[str, ...] = ()


class _FieldOptions(RoleOptions):
    config = _Config
    settings = (
        Setting("database.dsn", STR, None, "DSN.", required=True, field="dsn"),
        Setting("database.pool_size", positive(INT), FIELD, "Pool.", field="pool.size"),
        Setting("database.timeout", positive(FLOAT), FIELD, "Timeout.", field="pool.timeout"),
        Setting("cache.size", positive(INT), 8, "Cache.", field="cache.size"),
        Setting("name", STR, None, "Name (default: generated).", field="name"),
        Setting("urls", STRLIST, [], "URLs.", field="urls",
                convert=lambda urls: tuple(u.rstrip("/") for u in urls)),
        *table("auth", "auth[]", a=Row(STR, "A.", default=None), b=Row(STR, "B.", default="b")),
    )


def test_field_defaults_come_from_the_dataclass():
    defaults = {s.key: s.default for s in _FieldOptions.settings}
    # Checked by the kind: an integer default of a FLOAT setting reads as a float.
    assert defaults["database.pool_size"] == 4 and defaults["database.timeout"] == 10.0
    assert isinstance(defaults["database.timeout"], float)
    assert "[default: 4]" in dict((p[0], p[3]) for p in _FieldOptions.optParameters)[
        "database-pool-size"]


def test_build_fills_nested_fields():
    options = _FieldOptions()
    options.parseOptions([*DSN, "--database-pool-size", "7", "--urls", "http://a/,http://b"])
    config = options.config_of(options.values)
    assert config == _Config(dsn="dbname=test", pool=_Pool(size=7, timeout=10.0),
                             cache=_Pool(size=8), name="generated",
                             auth={"auth.a": None, "auth.b": "b"},
                             urls=("http://a", "http://b"))
    assert options.config_of(options.values, omit=("cache",)).cache is None


def test_unset_setting_keeps_the_field_default():
    options = _FieldOptions()
    options.parseOptions([*DSN, "--name", "given"])
    assert options.config_of(options.values).name == "given"


def test_field_default_needs_a_field():
    with pytest.raises(TypeError):
        resolve_defaults(_Config, [Setting("x", INT, FIELD, "X.")])
    with pytest.raises(TypeError):
        resolve_defaults(_Config, [Setting("dsn", STR, FIELD, "No default.", field="dsn")])


def test_build_refuses_an_unknown_field():
    with pytest.raises(TypeError):
        build(_Config, [Setting("x", INT, 1, "X.", field="nope")], {"x": 1})


def _role_options():
    from treadmill.imagestore.tap import Options as ImageStoreOptions
    from treadmill.logserver.tap import Options as LogServerOptions
    from treadmill.proxy.tap import Options as ProxyOptions
    from treadmill.supervisor.tap import Options as SupervisorOptions
    from treadmill.switchboard.tap import Options as SwitchboardOptions

    return [SwitchboardOptions, LogServerOptions, ProxyOptions, ImageStoreOptions,
            SupervisorOptions]


@pytest.mark.parametrize("options", _role_options(), ids=lambda o: o.__module__)
def test_role_settings_and_their_fields_agree(options):
    """Every role setting fills a field, and an explicit default (the file's form) is the
    field's default once converted: the two cannot drift apart."""
    for setting in options.settings:
        if setting.field is None:
            # Not config fields: a switch, a file read at start, the driver's own settings.
            from treadmill.supervisor.tap import DRIVER_SETTINGS
            assert (setting.key in ("cache.enabled", "switchboard.token_file")
                    or setting in DRIVER_SETTINGS), setting.key
            continue
        if setting.field.endswith("[]") or setting.default is None:
            continue
        value = setting.kind(setting.default)
        if setting.convert is not None:
            value = setting.convert(value)
        assert value == _field_default(options.config, setting.field), setting.key


@pytest.mark.parametrize("options", _role_options(), ids=lambda o: o.__module__)
def test_the_examples_show_every_setting(options):
    """docs/configuration.md: "The example files in etc/treadmill/ show every setting of
    each role", each key in its table, set or commented out."""
    role = options.__module__.split(".")[1]
    missing = [(_example_of(role, s.key), s.key) for s in options.all_settings()
               if s.key not in _shown_keys((EXAMPLES / _example_of(role, s.key)).read_text())]
    assert missing == []


DOCS = Path(__file__).parents[2] / "docs"
DRIVER_DOCS = {"mock": "supervisor.md", "qemu": "qemu.md", "serial": "serial.md"}


@pytest.mark.parametrize("options", _role_options(), ids=lambda o: o.__module__)
def test_every_setting_is_documented(options):
    """Each setting's key is in docs/ (`` `key` ``); a driver's setting may leave out the
    driver's table in its driver's page (`` `flash.command` `` in serial.md's table)."""
    from treadmill.supervisor.tap import DRIVER_SETTINGS

    docs = "\n".join(path.read_text() for path in DOCS.glob("*.md"))
    undocumented = []
    for setting in options.all_settings():
        driver, _, rest = setting.key.partition(".")
        if f"`{setting.key}`" in docs or (
                setting in DRIVER_SETTINGS
                and f"`{rest}`" in (DOCS / DRIVER_DOCS[driver]).read_text()):
            continue
        undocumented.append(setting.key)
    assert undocumented == []


def test_a_converted_none_replaces_the_field_default():
    """ "0: no limit" may mean None in the config, over a field default that is a limit."""
    zero_is_none = Setting("pool.timeout", FLOAT, 10.0, "Seconds; 0: none.", field="timeout",
                           convert=lambda seconds: seconds or None)
    assert build(_Pool, [zero_is_none], {"pool.timeout": 0.0}).timeout is None
    assert build(_Pool, [zero_is_none], {"pool.timeout": 3.0}).timeout == 3.0


def test_table_writes_each_key_and_field_once():
    """A table's rows are keyed by table and keyword, fill the field its template names
    unless a row names its own (or none), and keep their kind, help and options."""
    top, login = (
        table("", "{leaf}", root=Row(STR, "Root.", default=None, required=True)),
        table("login", "passwords.{leaf}",
              rate=Row(positive(FLOAT), "Rate."),
              burst=Row(INT, "Burst.", field="limits.burst"),
              note=Row(STR, "Note.", default="x", field=None),
              peers=Row(STRLIST, "Peers.", default=[], table=True, convert=tuple)),
    )
    assert [(s.key, s.field) for s in top + login] == [
        ("root", "root"), ("login.rate", "passwords.rate"), ("login.burst", "limits.burst"),
        ("login.note", None), ("login.peers", "passwords.peers")]
    assert top[0].required and top[0].default is None and top[0].help == "Root."
    assert login[0].default is FIELD and login[2].default == "x"
    assert login[3].table and login[3].convert is tuple and login[3].kind is STRLIST
    assert table("metrics", None, listen=Row(STR, "L.", default=None))[0].field is None
