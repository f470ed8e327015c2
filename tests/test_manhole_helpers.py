"""Each role's manhole helpers against the real role service, through a real manhole
(the role's namespace, served as the role serves it) over OpenSSH."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.imagestore.support import start_store
from tests.logserver.support import Keys as LogKeys
from tests.logserver.support import LogClient, new_job, start_logserver
from tests.proxy.support import Keys as ProxyKeys
from tests.proxy.support import opened_control, start_proxy
from tests.util.ssh import SSH, make_client_key, ssh_exec
from treadmill.common.manhole import manhole_service
from treadmill.protocol import proxy as messages


class Shell:
    """A manhole on loopback serving ``namespace``; ``run`` sends lines over SSH."""

    def __init__(self, namespace: dict[str, Any], tmp_path: Path):
        self.key = tmp_path / "manhole_id"
        (tmp_path / "manhole_authorized_keys").write_bytes(
            make_client_key(self.key).public().toString("openssh") + b"\n")
        self.service = manhole_service(
            reactor, ["tcp:0:interface=127.0.0.1"], str(tmp_path / "manhole_authorized_keys"),
            str(tmp_path / "manhole_host_key"), namespace)
        self.port = 0

    async def __aenter__(self) -> Shell:
        self.service.startService()
        (child,) = list(self.service)
        self.port = (await child._waitingForPort).getHost().port
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.service.stopService()

    async def run(self, command: str) -> tuple[str, int]:
        return await ssh_exec(self.port, self.key, command)

    async def json(self, expression: str) -> Any:
        """``expression``'s value, printed as JSON in the shell and parsed here."""
        out, code = await self.run(f"import json\nprint(json.dumps({expression}))")
        assert code == 0, out
        return json.loads(out)


pytestmark = pytest.mark.skipif(SSH is None, reason="no OpenSSH client installed")


@pytest_twisted.ensureDeferred
async def test_logserver_list_streams_and_delete_over_ssh(tmp_path: Path) -> None:
    keys = LogKeys(tmp_path)
    server = await start_logserver(tmp_path / "logs", keys)
    key = tmp_path / "id"
    (tmp_path / "authorized_keys").write_bytes(
        make_client_key(key).public().toString("openssh") + b"\n")
    manhole = manhole_service(reactor, ["tcp:0:interface=127.0.0.1"],
                              str(tmp_path / "authorized_keys"), str(tmp_path / "host_key"),
                              server.service.namespace())
    manhole.startService()
    try:
        (child,) = list(manhole)
        port = (await child._waitingForPort).getHost().port
        client, job, other = LogClient(server.url), new_job(), new_job()
        assert (await client.append(job, "console", 0, b"hello", keys.token(job, "append"),
                                    close=True)).code == 200
        assert (await client.append(other, "events", 0, b"{}\n",
                                    keys.token(other, "append"))).code == 200

        out, code = await ssh_exec(port, key, "import json\nprint(json.dumps(list_streams()))")
        assert code == 0, out
        assert json.loads(out) == {job: {"console": {"length": 5, "closed": True}},
                                   other: {"events": {"length": 3, "closed": False}}}
        out, code = await ssh_exec(port, key, f"await store.delete({job!r})\n"
                                              f"list_streams({job!r})")
        assert (out, code) == ("True\n{}\n", 0)
        assert (await client.read(job, "console", keys.token(job))).code == 404
    finally:
        await manhole.stopService()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_proxy_list_tunnels(tmp_path: Path) -> None:
    keys = ProxyKeys(tmp_path)
    proxy = await start_proxy(keys)
    try:
        async with Shell(proxy.service.namespace(), tmp_path) as shell:
            assert await shell.json("list_tunnels()") == []
            job = new_job()
            control = await opened_control(proxy, keys.token(job))
            control.send(messages.publish(1, "ssh", authenticates=True))  # a public TCP port
            port = (await control.next())["tcp_port"]
            (session,) = await shell.json("list_tunnels()")
            assert session["job"] == job and session["connected"] is True
            assert [(t["service"], t["tcp_port"], t["active"])
                    for t in session["tunnels"]] == [("ssh", port, 0)]
            control.sendClose(1000)
            await control.closed
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_imagestore_list_uploads(tmp_path: Path) -> None:
    store = await start_store(tmp_path / "store", None)
    try:
        async with Shell(store.service.namespace(), tmp_path) as shell:
            assert await shell.json("list_uploads()") == []
            r = await store.registry.request("POST", "/v2/lab/fw/blobs/uploads/")
            location = r.header("location")
            assert (await store.registry.request("PATCH", location, b"x" * 1000)).code == 202
            (upload,) = await shell.json("list_uploads()")
            assert upload["repository"] == "lab/fw" and upload["size"] == 1000
            assert upload["id"] in location and upload["writing"] is False
            out, code = await shell.run("(await collect_garbage()) is not None")
            assert (out, code) == ("True\n", 0)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_supervisor_status(tmp_path: Path) -> None:
    from treadmill.supervisor import tap

    parsed = tap.Options()
    parsed.parseOptions(["--switchboard-url", "ws://127.0.0.1:9", "--switchboard-token", "t",
                         "--state-dir", str(tmp_path / "state")])
    service = tap.makeService(parsed)
    async with Shell(service.namespace(), tmp_path) as shell:
        assert await shell.json("status()") == {"job": None, "pending_events": 0, "logs": {}}


@pytest_twisted.ensureDeferred
async def test_switchboard_list_links_shows_a_connected_supervisor(migrated_database: str,
                                                                   tmp_path: Path) -> None:
    from tests.support import start_switchboard
    from tests.switchboard.support import add_host, connected_peer
    from tests.util.waiting import eventually
    from treadmill.protocol import supervisor as protocol

    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2)
    try:
        async with Shell(sb.service.namespace(), tmp_path) as shell:
            assert await shell.json("list_links()") == []
            peer = await connected_peer(sb, await add_host(sb, "board-7"))
            (link,) = await shell.json("list_links()")
            assert link["host"] == "board-7" and link["minor"] == protocol.MINOR
            assert link["peer"].startswith("127.0.0.1:")
            (host,) = await shell.json("await list_hosts()")
            assert host == {"name": "board-7", "enabled": True, "healthy": True,
                            "connected": True, "current_job": None}
            peer.disconnect()
            await peer.closed()

            async def gone() -> bool:
                return await shell.json("list_links()") == []

            await eventually(gone)
    finally:
        await sb.stop()
