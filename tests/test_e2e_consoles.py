"""Consoles end to end through real daemons: a switchboard (real PostgreSQL), a proxy, a
supervisor with the mock host (its echo service), ``tml job connect``, over loopback.

The echo does not authenticate its users, so it has no public port; its WebSocket
opens only with a console token the switchboard gives to users holding the right
privilege on the job: ``read`` watches, ``manage`` types.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater

from tests.proxy.support import console, console_echo, echo_client, start_proxy
from tests.support import mock_supervisor, run_tml, start_switchboard
from tests.util.daemons import _Output
from tests.util.ports import free_port
from tests.util.waiting import eventually
from treadmill.common.captoken import CapabilitySigner, load_or_create_signing_key
from treadmill.protocol.proxy import ConsoleCloseCode

DIGEST = "sha256:" + "c" * 64


@pytest_twisted.ensureDeferred
async def test_console_tokens_end_to_end(migrated_database: str, tmp_path: Path) -> None:
    # The proxy trusts the switchboard's key (as an operator's keys_file would).
    key_path = tmp_path / "capability-key.pem"
    jwks = CapabilitySigner(load_or_create_signing_key(str(key_path)), "treadmill",
                            reactor).jwks()
    (tmp_path / "keys.json").write_text(json.dumps(jwks))
    proxy = await start_proxy(SimpleNamespace(keys_file=tmp_path / "keys.json"),
                              connect_timeout=2.0)
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 proxies=(proxy.ws,))
    r = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
    await sb.admin.post("/api/v1/hosts/mock-1/grants", {"user": "*", "privilege": "start"})
    supervisor = mock_supervisor(sb.url, r.body["token"], tmp_path / "mock-1", run_time=600.0)
    try:
        alice, bob = await sb.user("alice"), await sb.user("bob")
        mallory = await sb.user("mallory")
        job = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})).body
        assert "id" in job, job
        job_id = job["id"]
        assert (await alice.post(f"/api/v1/jobs/{job_id}/grants",
                                 {"user": "bob", "privilege": "read"})).status == 201

        async def listed() -> dict[str, Any] | None:
            endpoints = (await alice.get(f"/api/v1/jobs/{job_id}")).body["endpoints"]
            return endpoints[0] if endpoints else None

        endpoint = await eventually(listed, timeout=30)
        assert endpoint["service"] == "echo" and endpoint["auth"] == "token"
        assert "port" not in endpoint and proxy.registry.ports.in_use == set()
        url = endpoint["url"]

        # Who gets which token.
        path = f"/api/v1/jobs/{job_id}/console-token"
        assert (await mallory.post(path, {"access": "read"})).status == 404
        assert (await bob.post(path, {"access": "manage"})).status == 403
        assert (await bob.post(path, {"access": "sudo"})).status == 400
        read = (await bob.post(path, {"access": "read"})).body
        manage = (await alice.post(path)).body
        assert (read["access"], manage["access"]) == ("read", "manage")
        assert manage["endpoints"] == [endpoint]

        # Without a token: refused; with manage: typed and echoed.
        anonymous = await console(url)
        await anonymous.opened
        assert (await anonymous.closed)[0] == ConsoleCloseCode.UNAUTHORIZED
        assert await console_echo(url, manage["token"], b"alice types") == b"alice types"
        # bob watches: what he types never reaches the echo.
        watcher = await console(url, read["token"], "header")
        await watcher.opened
        watcher.type(b"bob types")
        await deferLater(reactor, 0.3, lambda: None)
        assert watcher.output == b""
        watcher.sendClose(1000)
        # Another job's token does not open this console.
        other = (await alice.post("/api/v1/jobs", {"image": DIGEST,
                                                   "tags": ["nowhere"]})).body["id"]
        elsewhere = (await alice.post(f"/api/v1/jobs/{other}/console-token")).body["token"]
        refused = await console(url, elsewhere)
        await refused.opened
        assert (await refused.closed)[0] == ConsoleCloseCode.FORBIDDEN

        # tml job connect fetches alice's token and types through the WebSocket.
        local = free_port()
        output = _Output(io.BytesIO())
        argv = [sys.executable, "-m", "treadmill.cli.main", "job", "connect", job_id[:8],
                "echo", "--local-port", str(local)]
        env = {**os.environ, "TREADMILL_URL": sb.url, "TREADMILL_TOKEN": alice.token,
               "TREADMILL_CONFIG": str(tmp_path / "none.toml")}
        process = reactor.spawnProcess(output, argv[0], argv, env=env)
        try:
            async def answers() -> bool:
                try:
                    client = await echo_client(local)
                except ConnectError:
                    return False
                client.transport.write(b"via tml")
                try:
                    return await client.wait_for(7) == b"via tml"
                finally:
                    client.transport.loseConnection()

            await eventually(answers, timeout=30)
        finally:
            process.signalProcess("TERM")
            await output.ended
        counts = proxy.registry.counts
        assert counts["console_manage"] == 2 and counts["console_read"] == 1
        assert counts["console_refused"] == 2

        # Every console connection reached the audit log through the supervisor
        # (proxy -> supervisor -> switchboard): who, which access, from where.
        opens = await eventually(lambda: _audited(sb.url, alice.token, job_id, "open"),
                                 timeout=30)
        assert sorted((e["actor"], e["details"]["access"]) for e in opens) == [
            ("alice", "manage"), ("alice", "manage"), ("bob", "read")]
        assert {e["source"] for e in opens} == {"127.0.0.1"}
        assert {e["details"]["host"] for e in opens} == {"mock-1"}
        closes = await eventually(lambda: _audited(sb.url, alice.token, job_id, "close"),
                                  timeout=30)
        assert {e["details"]["conn_id"] for e in closes} == {
            e["details"]["conn_id"] for e in opens}
        code, table = await run_tml(sb.url, bob.token, "audit", "--job", job_id[:8])
        assert code == 0 and "job.console_open" in table and "127.0.0.1" in table, table
        # A console still open when the job ends is closed with it, and recorded so.
        late = await console(url, read["token"])
        await late.opened
        await eventually(lambda: _audited(sb.url, alice.token, job_id, "open", 4), timeout=30)
        assert (await alice.post(f"/api/v1/jobs/{job_id}/terminate")).status == 200
        await late.closed
        closes = await eventually(lambda: _audited(sb.url, alice.token, job_id, "close", 4),
                                  timeout=30)
        assert closes[0]["actor"] == "bob"  # the newest first
        # mallory may not read the job: none of its records.
        assert (await mallory.get(f"/api/v1/audit?job={job_id}")).body["entries"] == []
        code, text = await run_tml(sb.url, mallory.token, "audit", "--job", job_id)
        assert "job.console" not in text, text
    finally:
        await supervisor.stopService()
        await sb.stop()
        await proxy.stop()


async def _audited(url: str, token: str, job_id: str, what: str,
                   count: int = 3) -> list[dict[str, Any]] | None:
    """``tml audit --job``'s ``job.console_<what>`` records once there are ``count``."""
    code, text = await run_tml(url, token, "audit", "--json", "--job", job_id[:8],
                               "--action", f"job.console_{what}")
    assert code == 0, text
    entries = json.loads(text)["entries"]
    return entries if len(entries) == count else None
