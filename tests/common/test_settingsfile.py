"""Settings declared as data: the ``settings.toml`` format, its names and its errors."""

from __future__ import annotations

import dataclasses
import textwrap
import typing

import pytest

from treadmill.common.config import FIELD, INT, STR, STRLIST, Setting, http_settings
from treadmill.common.settingsfile import SettingsFileError, config_class, parse

EXAMPLE = """
    [fields]
    "" = "{leaf}"
    database = "{leaf}"
    login = "passwords.{leaf}"

    [[settings]]
    group = "http"
    listeners = "API listeners"

    [[settings]]
    key = "database.dsn"
    type = "str"
    required = true
    help = "DSN."

    [[settings]]
    key = "database.pool_size"
    type = "positive int"
    help = \"\"\"\\
    Connections \\
    in the pool.\"\"\"

    [[settings]]
    key = "database.statement_timeout"
    type = "non-negative finite float"
    field = "timeouts.statement"
    help = "Seconds."

    [[settings]]
    key = "instance"
    type = "str"
    unset = true
    help = "Name."

    [[settings]]
    key = "login.proxies"
    type = "strlist"
    default = []
    convert = "tuple"
    help = "Proxies."

    [[settings]]
    key = "login.enabled"
    type = "bool"
    default = false
    field = false
    help = "Switch."

    [[settings]]
    key = "login.ports"
    type = "even"
    default = {}
    table = true
    help = "Ports."
"""


def _even(value: object) -> int:
    number = INT(value)
    if number % 2:
        raise ValueError("expected an even number")
    return number


def _parse(text: str, **names: object) -> tuple[Setting, ...]:
    return parse(textwrap.dedent(text), "role/settings.toml", **names)  # type: ignore[arg-type]


def test_a_file_declares_settings_in_order():
    settings = _parse(EXAMPLE, types={"even": _even})
    assert [s.key for s in settings] == [
        "listen", "http.access_log", "database.dsn", "database.pool_size",
        "database.statement_timeout", "instance", "login.proxies", "login.enabled",
        "login.ports"]
    assert settings[:2] == http_settings("API listeners")
    by_key = {s.key: s for s in settings}
    dsn, pool = by_key["database.dsn"], by_key["database.pool_size"]
    assert (dsn.kind, dsn.required, dsn.default, dsn.field) == (STR, True, None, "dsn")
    assert (pool.default, pool.field, pool.help) == (FIELD, "pool_size",
                                                     "Connections in the pool.")
    assert by_key["database.statement_timeout"].field == "timeouts.statement"
    assert (by_key["instance"].default, by_key["instance"].required) == (None, False)
    proxies = by_key["login.proxies"]
    assert (proxies.kind, proxies.default, proxies.field, proxies.convert) == (
        STRLIST, [], "passwords.proxies", tuple)
    assert (by_key["login.enabled"].field, by_key["login.enabled"].default) == (None, False)
    ports = by_key["login.ports"]
    assert ports.table and ports.kind is _even and ports.default == {}


NARROWED = {  # type: (a good value, a bad one)
    "positive int": ("3", "0"), "positive float": ("0.5", "-1"), "non-negative int": ("0", "-1"),
    "non-negative float": ("inf", "-0.5"), "non-negative finite float": ("0", "inf"),
    "positive even": ("2", "-2"),
}


@pytest.mark.parametrize("kind", NARROWED)
def test_modifiers_narrow_the_type_after_them(kind):
    good, bad = NARROWED[kind]
    (setting,) = _parse(f"""
        [[settings]]
        key = "x"
        type = "{kind}"
        default = 1
        help = "X."
    """, types={"even": _even})
    setting.kind(good)
    with pytest.raises(ValueError):
        setting.kind(bad)


def test_groups_take_their_arguments_from_the_entry():
    def pair(prefix: str, whom: str) -> tuple[Setting, ...]:
        return tuple(Setting(f"{prefix}{n}", STR, None, f"{n} for {whom}.") for n in "ab")

    settings = _parse("""
        [[settings]]
        key = "first"
        type = "int"
        default = 1
        help = "First."

        [[settings]]
        group = "pair"
        prefix = "up."
        whom = "upstreams"
    """, groups={"pair": pair})
    assert [(s.key, s.help) for s in settings] == [
        ("first", "First."), ("up.a", "a for upstreams."), ("up.b", "b for upstreams.")]


def _entry(**lines: str) -> str:
    fields = {"key": '"db.size"', "type": '"int"', "help": '"Size."', **lines}
    return "[[settings]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items() if v)


@pytest.mark.parametrize(("text", "problem"), [
    (_entry(type='"positiv int"'), "db.size: unknown type 'positiv int' (known: str, int"),
    (_entry(type='"finite float"'), "db.size: unknown type 'finite float'"),
    (_entry(hlep='"Size."'), "db.size: unknown key 'hlep' (known: convert, default,"),
    (_entry(convert='"tupel"'), "db.size: unknown converter 'tupel' (known: tuple, list"),
    (_entry(field="3"), "db.size: field must be a string or false, got 3"),
    (_entry(help=""), "db.size: help is missing"),
    (_entry(type=""), "db.size: type is missing"),
    (_entry(default="1", required="true"), "db.size: give at most one of default, unset"),
    (_entry() + _entry(), "db.size: declared twice"),
    ('[[settings]]\ngroup = "nope"\n', "unknown group 'nope' (known: http)"),
    ('[[settings]]\ngroup = "http"\nlistner = "API"\n', "group 'http': http_settings() got an"),
    ('[[settings]]\nhelp = "Orphan."\n', "an entry needs a key or a group"),
    ('[setting]\nkey = "x"\n', "unknown key 'setting' (expected fields and [[settings]])"),
    ("[[settings]\n", "invalid TOML"),
])
def test_a_malformed_file_names_the_file_the_key_and_the_problem(text, problem):
    with pytest.raises(SettingsFileError) as caught:
        parse(text, "role/settings.toml")
    assert str(caught.value).startswith("role/settings.toml: ")
    assert problem in str(caught.value)


def test_every_role_file_loads_with_its_role():
    """Each role's ``settings.toml`` ships in its package and loads at import, each key
    once; the common settings are not declared again."""
    from treadmill.common.config import COMMON_SETTINGS
    from treadmill.imagestore.tap import Options as ImageStore
    from treadmill.logserver.tap import Options as LogServer
    from treadmill.proxy.tap import Options as Proxy
    from treadmill.supervisor.tap import Options as Supervisor
    from treadmill.switchboard.tap import Options as Switchboard

    common = {s.key for s in COMMON_SETTINGS}
    for options in (Switchboard, LogServer, Proxy, ImageStore, Supervisor):
        keys = [s.key for s in options.all_settings()]
        assert len(keys) == len(set(keys)), options.__module__
        assert not common & {s.key for s in options.settings}, options.__module__


DERIVED = """
    [fields]
    pool = "pool.{leaf}"

    [[settings]]
    key = "pool.size"
    type = "positive int"
    default = 4
    help = "Size."

    [[settings]]
    key = "pool.peers"
    type = "strlist"
    default = []
    convert = "tuple"
    help = "Peers."

    [[settings]]
    key = "pool.hosts"
    type = "strlist"
    default = ["a"]
    help = "Hosts."

    [[settings]]
    key = "pool.name"
    type = "str"
    unset = true
    help = "Name."

    [[settings]]
    key = "pool.even"
    type = "even"
    default = 2
    help = "Even."

    [[settings]]
    key = "other.size"
    type = "int"
    default = 1
    field = "other.size"
    help = "Not the pool's."
"""


def test_a_config_class_takes_its_fields_from_the_settings():
    settings = _parse(DERIVED, types={"even": _even})

    @config_class(settings, "pool", frozen=True)
    class Pool:
        """A pool."""

        label: str = "mine"

        @property
        def double(self) -> int:
            return 2 * self.size

    assert Pool.__doc__ == "A pool."
    assert typing.get_type_hints(Pool) == {
        "label": str, "size": int, "peers": tuple[str, ...], "hosts": list[str],
        "name": str | None, "even": int}
    assert Pool() == Pool(label="mine", size=4, peers=(), hosts=["a"], name=None, even=2)
    assert Pool(size=3).double == 6
    first, second = Pool(), Pool()
    first.hosts.append("b")
    assert second.hosts == ["a"]  # A list default is copied, never shared.
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.size = 5  # type: ignore[misc]


def test_a_config_class_needs_its_defaults_in_the_file():
    settings = _parse("""
        [[settings]]
        key = "pool.size"
        type = "int"
        field = "pool.size"
        help = "Size (the field's default)."
    """)
    with pytest.raises(TypeError, match=r"Pool\.size: pool\.size needs its type and default"):
        @config_class(settings, "pool")
        class Pool:
            """A pool."""


def test_the_derived_config_classes_keep_their_methods_and_keywords():
    from treadmill.imagestore.cache import CacheConfig
    from treadmill.switchboard.auth import PasswordPolicy
    from treadmill.switchboard.links import LinkPolicy

    assert LinkPolicy(unreachable_after=8.0).touch_interval == 2.0
    assert LinkPolicy().ping_interval == 5.0 and PasswordPolicy().trusted_proxies == ()
    assert CacheConfig(upstreams=["https://a"]).lease_max == 7 * 86400.0
    for cls in (LinkPolicy, PasswordPolicy, CacheConfig):
        assert cls.__doc__ and all(
            hint is not typing.Any for hint in typing.get_type_hints(cls).values()), cls
