"""Password guessing is rate-limited per address and per user, before any hashing.

A real switchboard on loopback; clients connect from 127.0.0.1 or 127.0.0.2
(two addresses of the loopback network) to stand for two machines. A counting
wrapper around the real scrypt check tells how many hashes ran, and how many
at once.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.web.client import Agent

from tests.support import RunningSwitchboard, start_switchboard
from treadmill.switchboard import credentials
from treadmill.switchboard.auth import PasswordPolicy

PASSWORD = "correct horse battery"
POLICY = PasswordPolicy(address_rate=0.2, address_burst=4, user_rate=0.1, user_burst=6,
                        table_size=10, max_hashing=2, hashing_queue=8,
                        trusted_proxies=("127.0.0.3",))


class HashCounter:
    """Counts the real password checks, and the most that ran at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.most = 0

    def wrap(self, real: Any) -> Any:
        def counted(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                return real(*args, **kw)
            finally:
                self.running -= 1
        return counted


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> Iterator[HashCounter]:
    counter = HashCounter()
    monkeypatch.setattr(credentials, "verify_password_sync",
                        counter.wrap(credentials.verify_password_sync))
    yield counter


async def make_switchboard(migrated_database: str, tmp_path: Path, policy: PasswordPolicy
                           ) -> RunningSwitchboard:
    sb = await start_switchboard(migrated_database, tmp_path, passwords=policy)
    for name in ("alice", "bob"):
        hashed = credentials.hash_password_sync(PASSWORD)
        await sb.store.create_user(name, False, hashed)
    return sb


@pytest_twisted.async_yield_fixture
async def sb(database: str, tmp_path: Path):
    running = await make_switchboard(database, tmp_path, POLICY)
    await running.register_store("https://store.example", "store")
    try:
        yield running
    finally:
        await running.stop()


def agent_from(address: str) -> Agent:
    return Agent(reactor, bindAddress=(address, 0))


async def login(sb: RunningSwitchboard, user: str, password: str, *, source: str = "127.0.0.1",
                headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    response = await treq.post(sb.url + "/api/v1/login",
                               json.dumps({"user": user, "password": password}).encode(),
                               headers={"content-type": "application/json", **(headers or {})},
                               agent=agent_from(source))
    body = json.loads(await response.content())
    return response.code, body, response.headers


async def basic(sb: RunningSwitchboard, user: str, password: str, source: str = "127.0.0.1"
                ) -> tuple[int, Any, Any]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    response = await treq.get(sb.url + "/api/v1/registry/token?service=store",
                              headers={"authorization": f"Basic {raw}"},
                              agent=agent_from(source))
    return response.code, json.loads(await response.content()), response.headers


@pytest_twisted.ensureDeferred
async def test_a_flood_gets_429_with_retry_after_before_any_hashing(sb, hashes) -> None:
    results = [await login(sb, "alice", f"guess {i}") for i in range(12)]
    codes = [code for code, _, _ in results]
    assert codes == [401] * 4 + [429] * 8
    assert hashes.calls == 4  # The refused attempts cost no hashing.
    code, body, headers = results[-1]
    assert body["error"]["code"] == "too_many_requests"
    # 1 attempt per 5 s, less the time the hashing took (seconds on a loaded machine).
    assert 1 <= int(headers.getRawHeaders("retry-after")[0]) <= 5
    # HTTP Basic on the registry token endpoint shares the address's budget.
    code, body, headers = await basic(sb, "alice", "another guess")
    assert code == 429 and headers.getRawHeaders("retry-after")[0] in ("3", "4", "5")
    # Even the right password waits: the limit is checked before the password.
    assert (await login(sb, "alice", PASSWORD))[0] == 429
    assert hashes.calls == 4

    # A legitimate user on another address still logs in, and again and again:
    # right passwords give their attempt back.
    for _ in range(6):
        code, body, _ = await login(sb, "bob", PASSWORD, source="127.0.0.2")
        assert code == 201 and body["token"].startswith("tmu_"), body
    code, body, _ = await basic(sb, "bob", PASSWORD, source="127.0.0.2")
    assert code == 200 and body["token"], body


@pytest_twisted.ensureDeferred
async def test_one_user_is_limited_across_addresses(sb, hashes) -> None:
    codes = []
    for i in range(8):
        source = "127.0.0.1" if i % 2 else "127.0.0.2"
        codes.append((await basic(sb, "alice", f"guess {i}", source))[0])
    assert codes == [401] * 6 + [429] * 2  # alice's own budget (6), not the addresses' (4 each)
    assert hashes.calls == 6
    # Others are not affected.
    assert (await login(sb, "bob", PASSWORD, source="127.0.0.1"))[0] == 201


@pytest_twisted.ensureDeferred
async def test_limiter_tables_stay_bounded_under_many_addresses_and_users(sb, hashes) -> None:
    guard = sb.service.api.passwords
    largest = 0
    for i in range(POLICY.table_size + 4):
        # Behind the trusted proxy each request names its own client address.
        code, _, _ = await login(sb, f"user{i}", "guess", source="127.0.0.3",
                                 headers={"x-forwarded-for": f"198.51.100.7, 203.0.113.{i}"})
        assert code == 401
        largest = max(largest, len(guard.by_address), len(guard.by_user))
    assert largest == POLICY.table_size
    # X-Forwarded-For from anyone else is ignored: it counts against the peer.
    for i in range(5):
        code, _, _ = await login(sb, f"other{i}", "guess",
                                 headers={"x-forwarded-for": f"203.0.113.{100 + i}"})
    assert code == 429


@pytest_twisted.ensureDeferred
async def test_concurrent_hashing_is_bounded(database: str, tmp_path: Path, hashes) -> None:
    policy = PasswordPolicy(address_burst=100, user_burst=100, max_hashing=2, hashing_queue=3)
    sb = await make_switchboard(database, tmp_path, policy)
    try:
        results = await gatherResults([
            defer_login(sb, f"user{i}") for i in range(12)])
    finally:
        await sb.stop()
    codes = sorted(code for code, _, _ in results)
    assert hashes.most <= 2
    assert codes.count(401) >= 5 and 503 in codes, codes
    refused = next(r for r in results if r[0] == 503)
    assert refused[2].getRawHeaders("retry-after") == ["1"]
    assert refused[1]["error"]["code"] == "unavailable"


def defer_login(sb: RunningSwitchboard, user: str) -> Any:
    from twisted.internet.defer import Deferred
    return Deferred.fromCoroutine(login(sb, user, "guess"))


def parse(*args: str) -> dict[str, Any]:
    """The switchboard's option values from ``args`` (the command line)."""
    from treadmill.switchboard.tap import Options

    options = Options()
    options.parseOptions(list(args))
    return options.values


def test_login_settings_reach_the_policy(tmp_path: Path) -> None:
    from treadmill.switchboard.tap import config_from

    config = tmp_path / "switchboard.toml"
    config.write_text('[database]\ndsn = "dbname=x"\n[login]\naddress_burst = 7\n'
                      'trusted_proxies = ["10.0.0.1"]\nhashing_queue = 0\n')
    values = parse("--config", str(config), "--login-user-rate", "0.5")
    policy = config_from(values).passwords
    assert policy == PasswordPolicy(address_burst=7, user_rate=0.5, hashing_queue=0,
                                    trusted_proxies=("10.0.0.1",))
    assert config_from(parse("--database-dsn", "x")).passwords == \
        PasswordPolicy()


@pytest_twisted.ensureDeferred
async def test_end_to_end_through_the_daemon_and_tml(database: str, tmp_path: Path) -> None:
    """``twistd treadmill-switchboard`` with [login] settings; ``tml`` as users run it:
    a guessing ``tml login`` is refused with the switchboard's 429 message, and a
    secret given through the environment is gone from PostgreSQL once the job ends."""
    import io

    import psycopg2

    from tests.support import write_switchboard_config
    from tests.util.daemons import Daemon, bootstrap_admin
    from tests.util.ports import free_port
    from treadmill.cli.main import run as tml

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_switchboard_config(tmp_path / "switchboard.toml", database, port, tmp_path)
    with config.open("a") as f:
        f.write("[login]\naddress_burst = 2\naddress_rate = 0.01\n")
    daemon = Daemon("treadmill-switchboard", ["--config", str(config)])
    daemon.start()

    async def cli(*argv: str, stdin: str = "", **env: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await tml(reactor, ["--url", url, *argv], out, err,
                         {"HOME": str(tmp_path), **env}, stdin=io.StringIO(stdin))
        return code, out.getvalue() + err.getvalue()

    try:
        await daemon.wait_http(f"{url}/healthz")
        admin = {"TREADMILL_TOKEN": await bootstrap_admin("--config", str(config))}
        code, text = await cli("admin", "user", "add", "alice", "--password-stdin",
                               stdin=PASSWORD, **admin)
        assert code == 0, text
        login = ("login", "--user", "alice", "--password-stdin")
        for _ in range(2):
            code, text = await cli(*login, stdin="wrong guess\n")
            assert code == 1 and "wrong user name or password" in text, text
        code, text = await cli(*login, stdin=PASSWORD + "\n")
        assert code == 1 and "too many password attempts" in text, text

        code, text = await cli("job", "submit", "sha256:" + "1" * 64, "--tag", "nowhere",
                               "--secret-param", "API_KEY", API_KEY="hush-9f8e7d", **admin)
        assert code == 0 and "warning" not in text, text
        job = text.split()[0]
        code, text = await cli("job", "cancel", job, **admin)
        assert code == 0, text
    finally:
        await daemon.stop()
    conn = psycopg2.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT parameters, strpos(jobs::text, 'hush-9f8e7d') FROM jobs")
            assert cur.fetchall() == [({"API_KEY": {"value": "", "secret": True}}, 0)]
    finally:
        conn.close()
    assert "Traceback (most recent" not in daemon.output, daemon.output
