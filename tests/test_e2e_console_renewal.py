"""Console token renewal end to end: a switchboard (real PostgreSQL) whose console tokens
live 3 s, a proxy that closes a console 2 s after its token's expiry unless renewed, a
supervisor with the mock host (its echo service), ``tml job connect`` as a process.

``tml`` keeps a console open across several token lifetimes by renewing its token on the
open WebSocket; once the user's right on the job is revoked the switchboard refuses the
next token and the proxy closes the console within the documented bound (the token's
lifetime plus ``console_grace``).
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

from tests.proxy.support import console, echo_client, start_proxy
from tests.support import mock_supervisor, start_switchboard
from tests.util.daemons import _Output
from tests.util.ports import free_port
from tests.util.waiting import eventually, sleep
from treadmill.common.captoken import CapabilitySigner, load_or_create_signing_key
from treadmill.protocol.proxy import ConsoleCloseCode
from treadmill.switchboard.api.limits import Limits

DIGEST = "sha256:" + "d" * 64
TTL = 3.0
GRACE = 2.0  # room for a slow renewal on a loaded machine
SLACK = 3.0  # the close travelling from the proxy through tml to its local client


@pytest_twisted.ensureDeferred
async def test_a_revoked_users_console_closes_within_the_bound(migrated_database: str,
                                                               tmp_path: Path) -> None:
    key_path = tmp_path / "capability-key.pem"
    jwks = CapabilitySigner(load_or_create_signing_key(str(key_path)), "treadmill",
                            reactor).jwks()
    (tmp_path / "keys.json").write_text(json.dumps(jwks))
    proxy = await start_proxy(SimpleNamespace(keys_file=tmp_path / "keys.json"),
                              connect_timeout=2.0, console_grace=GRACE)
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 proxies=(proxy.ws,), limits=Limits(console_token_ttl=TTL))
    r = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
    await sb.admin.post("/api/v1/hosts/mock-1/grants", {"user": "*", "privilege": "start"})
    supervisor = mock_supervisor(sb.url, r.body["token"], tmp_path / "mock-1", run_time=600.0)
    output = _Output(io.BytesIO())
    process: Any = None
    try:
        alice, bob = await sb.user("alice"), await sb.user("bob")
        job_id = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})
                  ).body["id"]
        grants = f"/api/v1/jobs/{job_id}/grants"
        assert (await alice.post(grants, {"user": "bob", "privilege": "manage"})).status == 201

        async def listed() -> dict[str, Any] | None:
            endpoints = (await alice.get(f"/api/v1/jobs/{job_id}")).body["endpoints"]
            return endpoints[0] if endpoints else None

        url = (await eventually(listed, timeout=30))["url"]
        token = (await bob.post(f"/api/v1/jobs/{job_id}/console-token")).body
        assert token["expires_in"] == int(TTL)
        # A client that never renews is closed at its token's exp plus the grace.
        idle = await console(url, token["token"])
        await idle.opened

        # bob's tml job connect: one local connection kept open across token lifetimes.
        local = free_port()
        argv = [sys.executable, "-m", "treadmill.cli.main", "job", "connect", job_id[:8],
                "echo", "--local-port", str(local)]
        env = {**os.environ, "TREADMILL_URL": sb.url, "TREADMILL_TOKEN": bob.token,
               "TREADMILL_CONFIG": str(tmp_path / "none.toml")}
        process = reactor.spawnProcess(output, argv[0], argv, env=env)

        async def connected() -> Any:
            try:
                return await echo_client(local)
            except ConnectError:
                return None

        typist = await eventually(connected, timeout=30)

        async def echoes(text: bytes) -> None:
            before = len(typist.data)
            typist.transport.write(text)
            assert (await typist.wait_for(before + len(text))).endswith(text)

        await echoes(b"first")
        await sleep(2 * TTL)  # two more lifetimes: kept open by tml's renewals
        await echoes(b"second")
        assert (await idle.closed) == (ConsoleCloseCode.UNAUTHORIZED, "console token expired")
        assert proxy.registry.counts["console_renewed"] >= 2
        assert proxy.registry.counts["console_expired"] == 1  # the idle client's only

        # Revoked: the next renewal is refused, and the console closes within the bound.
        assert (await alice.delete(f"{grants}/bob/manage")).status in (200, 204)
        revoked = reactor.seconds()
        await typist.lost
        assert reactor.seconds() - revoked <= TTL + GRACE + SLACK
        assert proxy.registry.counts["console_expired"] == 2
        assert (await bob.post(f"/api/v1/jobs/{job_id}/console-token")).status == 404
    finally:
        if process is not None:
            process.signalProcess("TERM")
            await output.ended
        await supervisor.stopService()
        await sb.stop()
        await proxy.stop()
    said = output.log.getvalue().decode()
    assert "refused a new console token" in said, said
