"""The web console's browser tests' daemons: a switchboard, a log server, a proxy and a
mock supervisor (``stack``), and the users who log in."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.proxy.support import start_proxy
from tests.support import Client, RunningSwitchboard, start_switchboard
from tests.util.ports import free_port
from tests.web.browser import Browser
from treadmill.common.captoken import CapabilitySigner, load_or_create_signing_key
from treadmill.dev.fleet import ws_url_for
from treadmill.logserver.service import LogServerConfig, LogServerService
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.drivers.mock import MockSettings
from treadmill.supervisor.service import SupervisorService
from treadmill.switchboard import credentials
from treadmill.switchboard.api import Limits

DIGEST = "sha256:" + "7" * 64
PASSWORD = "console password"


@dataclass
class Stack:
    sb: RunningSwitchboard
    logs: str
    host_token: str


async def _stack(database: str, tmp_path: Path, stops: list[Callable[[], Any]], *,
                 console_token_ttl: float = 300.0, console_grace: float = 30.0) -> Stack:
    """Starts the daemons, each one's stop appended to ``stops`` as soon as it runs; the
    switchboard's console tokens live ``console_token_ttl``, the proxy's consoles outlive
    them unrenewed ``console_grace``."""
    key = tmp_path / "capability-key.pem"
    jwks = CapabilitySigner(load_or_create_signing_key(str(key)), "treadmill", reactor).jwks()
    (tmp_path / "keys.json").write_text(json.dumps(jwks))
    proxy = await start_proxy(SimpleNamespace(keys_file=tmp_path / "keys.json"),
                              console_grace=console_grace)
    stops.append(proxy.service.stopService)
    logs_port = free_port()
    logs_url = f"http://127.0.0.1:{logs_port}"
    sb = await start_switchboard(database, tmp_path, scheduler_interval=0.2,
                                 health_interval=0.5,
                                 limits=Limits(log_servers=(logs_url,), log_replicas=1,
                                               console_token_ttl=console_token_ttl),
                                 proxies=(proxy.ws,))
    stops.append(sb.stop)
    logserver = LogServerService(reactor, LogServerConfig(
        root=str(tmp_path / "logs"), listen=[f"tcp:{logs_port}:interface=127.0.0.1"],
        auth={"auth.keys_file": str(key)}, fsync="never", access_log=False,
        cors_origins=(sb.url,)))
    logserver.startService()
    stops.append(logserver.stopService)
    await logserver.ready()
    r = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
    assert r.status == 201, r.body
    await sb.admin.post("/api/v1/hosts/mock-1/grants", {"user": "*", "privilege": "start"})
    return Stack(sb, logs_url, r.body["token"])


async def _supervise(config: SupervisorConfig, stops: list[Callable[[], Any]]) -> None:
    """Starts a supervisor (its stop appended to ``stops``) and waits for its link."""
    supervisor = SupervisorService(reactor, config)
    supervisor.startService()
    stops.append(supervisor.stopService)
    await supervisor.connected()


async def _user(sb: RunningSwitchboard, name: str, admin: bool = False) -> Client:
    row = await sb.store.create_user(name, admin, credentials.hash_password_sync(PASSWORD))
    token = credentials.new_token(credentials.USER_TOKEN_PREFIX)
    await sb.store.create_token(row["id"], credentials.token_hash(token), "test", 3600)
    return Client(sb.url, token)


async def shared_job(sb: RunningSwitchboard, privilege: str) -> tuple[Client, dict[str, Any]]:
    """Users alice and bob, and alice's mock job on which bob has ``privilege``."""
    alice = await _user(sb, "alice")
    await _user(sb, "bob")
    job = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})).body
    r = await alice.post(f"/api/v1/jobs/{job['id']}/grants",
                         {"user": "bob", "privilege": privilege})
    assert r.status == 201, r.body
    return alice, job


async def _log_in(browser: Browser, url: str, user: str) -> None:
    await browser.reset()
    await browser.get(f"{url}/#/login")
    await browser.wait_for("document.querySelector('#login-form')")
    await browser.type("#login-user", user)
    await browser.type("#login-password", PASSWORD)
    await browser.click("#login-form button[type=submit]")
    await browser.wait_for("document.querySelector('#whoami')?.textContent.startsWith("
                           f"{json.dumps(user)})")


async def open_terminal(browser: Browser, url: str, user: str, job_id: str) -> None:
    """Log ``user`` in, open the job's page and a terminal on its echo console (manage),
    and wait until it can be typed into."""
    await _log_in(browser, url, user)
    await browser.get(f"{url}/#/jobs/{job_id}")
    # The mock host's echo service appears as an endpoint that needs a console token.
    await browser.wait_for("document.querySelector('tr[data-service=\"echo\"] .open-terminal')",
                           30)
    await browser.click("tr[data-service=\"echo\"] .open-terminal")
    await browser.wait_for("document.querySelector('#terminal-status').textContent"
                           ".includes('type here')")
    await browser.script("document.querySelector('#terminal').scrollIntoView()")


async def type_echoed(browser: Browser, text: str) -> None:
    """Type ``text`` into the open terminal and wait for the echo console's answer."""
    await browser.type("#terminal .xterm-helper-textarea", text, clear=False)
    await browser.wait_for("(document.querySelector('#terminal').dataset.tail || '')"
                           f".includes({json.dumps(text)})")


@pytest_twisted.async_yield_fixture
async def stack(database: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with mock_stack(database, tmp_path) as built:
        yield built


@contextlib.asynccontextmanager
async def mock_stack(database: str, tmp_path: Path, **settings: float
                     ) -> AsyncIterator[Stack]:
    """The daemons (``settings``: :func:`_stack`'s) and a mock supervisor, stopped after."""
    stops: list[Callable[[], Any]] = []  # a failed start-up stops what already runs
    try:
        built = await _stack(database, tmp_path, stops, **settings)
        await _supervise(SupervisorConfig(
            url=ws_url_for(built.sb.url), token=built.host_token,
            state_dir=str(tmp_path / "sup"), reconnect_initial=0.1, reconnect_max=1.0,
            durable=False,
            driver_values=MockSettings(durations=dict.fromkeys(STAGES, 0.05), run_time=120,
                                       console_rate=4000).values()), stops)
        yield built
    finally:
        for stop in reversed(stops):
            await stop()
