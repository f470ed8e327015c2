"""Argument parsing, and usage errors through ``run()`` (no server involved)."""

from __future__ import annotations

import argparse
import io

import pytest
import pytest_twisted

from treadmill.cli.commands.jobs import parameters_body
from treadmill.cli.context import UsageError, duration, name_value
from treadmill.cli.main import build_parser, parse_args


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_global_options_before_or_after_the_command():
    a = parse("--url", "http://a", "--json", "job", "ls")
    assert (a.url, a.json, a.token) == ("http://a", True, None)
    a = parse("job", "ls", "--url", "http://b", "--token", "t", "--json")
    assert (a.url, a.json, a.token) == ("http://b", True, "t")
    a = parse("job", "ls")
    assert (a.url, a.json) == (None, False)


def test_job_submit():
    a = parse(
        "job",
        "submit",
        "debian",
        "--tag",
        "a",
        "--tag",
        "b",
        "--param",
        "X=1",
        "--secret-param",
        "Y=2",
        "--timeout",
        "1h",
        "--queue-timeout",
        "90",
        "--max-restarts",
        "0",
        "--label",
        "l",
        "-f",
    )
    assert a.image == "debian"
    assert a.tags == ["a", "b"]
    assert a.params == [("X", "1")]
    assert a.secret_params == ["Y=2"]
    assert (a.timeout, a.queue_timeout, a.max_restarts, a.label) == (3600, 90, 0, "l")
    assert a.follow


def test_hold_on_failure_takes_a_duration_on_submit_and_run():
    for command in ("submit", "run"):
        assert parse("job", command, "img", "--hold-on-failure", "2h").hold_on_failure == 7200
        assert parse("job", command, "img", "--hold-on-failure", "90").hold_on_failure == 90
        assert parse("job", command, "img").hold_on_failure is None


def test_job_ls_options():
    a = parse("job", "ls", "--state", "ready", "--owner", "u", "--limit", "5", "--all")
    assert (a.state, a.owner, a.limit, a.all) == ("ready", "u", 5, True)


def test_admin_user_set_tristate():
    a = parse("admin", "user", "set", "bob")
    assert (a.admin, a.disabled) == (None, None)
    a = parse("admin", "user", "set", "bob", "--no-admin", "--enable")
    assert (a.admin, a.disabled) == (False, False)
    a = parse("admin", "user", "set", "bob", "--admin", "--disable")
    assert (a.admin, a.disabled) == (True, True)


def test_grant_words():
    assert parse("grant", "host", "h1", "bob", "read").words == ["host", "h1", "bob", "read"]
    assert parse("grant", "ls", "job", "j").words == ["ls", "job", "j"]


def test_duration():
    assert duration("90") == 90
    assert duration("1.5") == 1.5
    assert duration("15m") == 900
    assert duration("2h") == 7200
    assert duration("30d") == 2592000
    assert duration("1w") == 604800
    with pytest.raises(argparse.ArgumentTypeError):
        duration("soon")


def test_name_value():
    assert name_value("A=b=c") == ("A", "b=c")
    assert name_value("A=") == ("A", "")
    for bad in ("A", "=b"):
        with pytest.raises(argparse.ArgumentTypeError):
            name_value(bad)


def test_parameters_body():
    a = argparse.Namespace(params=[("A", "1")], secret_params=["B=2", "C"])
    assert parameters_body(a, {"C": "from-env"}) == {
        "A": {"value": "1", "secret": False},
        "B": {"value": "2", "secret": True},
        "C": {"value": "from-env", "secret": True},
    }
    with pytest.raises(UsageError, match="no environment variable C"):
        parameters_body(a, {})
    with pytest.raises(UsageError, match="twice"):
        parameters_body(argparse.Namespace(params=[("A", "1")], secret_params=["A=2"]), {})


def test_help_exits_0_on_stdout():
    out, err = io.StringIO(), io.StringIO()
    assert parse_args(["job", "submit", "--help"], out, err) == 0
    assert "usage: tml job submit" in out.getvalue()
    assert err.getvalue() == ""


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["job"],
        ["job", "submit"],
        ["job", "ls", "--state", "running"],
        ["job", "submit", "img", "--param", "novalue"],
        ["admin", "user", "set", "bob", "--admin", "--no-admin"],
        ["admin", "token", "create"],
        ["image", "register", "n", "sha256:00"],
        ["nope"],
    ],
)
def test_usage_errors_exit_2_on_stderr(argv):
    out, err = io.StringIO(), io.StringIO()
    assert parse_args(argv, out, err) == 2
    assert "usage: tml" in err.getvalue()
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grant", "host", "h1"], "usage: tml grant KIND ID USER PRIVILEGE"),
        (["grant", "ls", "host"], "usage: tml grant ls KIND ID"),
        (["grant", "widget", "w", "bob", "read"], "unknown kind 'widget'"),
        (["admin", "user", "set", "bob"], "nothing to change"),
        (["host", "tags", "h1", "a", "--clear"], "not both"),
        (["login", "--password-stdin"], "--user is required"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_usage_errors_found_by_commands_exit_2(tml, argv, message):
    result = await tml(*argv, "--url", "http://127.0.0.1:9")
    assert result.status == 2
    assert message in result.err
    assert result.err.startswith("usage: tml")


@pytest_twisted.ensureDeferred
async def test_bad_config_exits_1(tml, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("url = [")
    result = await tml("whoami", env={"TREADMILL_CONFIG": str(bad)})
    assert result.status == 1
    assert result.err.startswith(f"tml: error: {bad}: invalid TOML")
