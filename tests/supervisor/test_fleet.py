"""Fleet mode: many supervisors in one process, hosts made through the HTTP API."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.supervisor.peer import FakeSwitchboard, job
from tests.util.daemons import Daemon, _Output
from tests.util.waiting import eventually, within
from treadmill.dev.fleet import FleetError, parser, start_fleet, ws_url_for

ADMIN = "tma_admin-token"


class FakeHostsAPI(Resource):
    """The three host routes the fleet uses, feeding tokens to the peer."""

    isLeaf = True

    def __init__(self, peer: FakeSwitchboard):
        super().__init__()
        self.peer = peer
        self.hosts: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str]] = []
        self._serial = itertools.count(1)

    def _token(self, name: str) -> str:
        for token, host in list(self.peer.tokens.items()):
            if host == name:
                del self.peer.tokens[token]  # the old token stops working
        token = f"tmh_{name}_{next(self._serial)}"
        self.peer.tokens[token] = name
        return token

    def render(self, request: Any) -> bytes:
        method, path = request.method.decode(), request.path.decode()
        self.requests.append((method, path))
        request.setHeader("content-type", "application/json")
        if request.getHeader("authorization") != f"Bearer {ADMIN}":
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "no"}}'
        body = json.loads(request.content.read() or b"null")
        parts = path.split("/")  # '', api, v1, hosts, NAME, ACTION
        if method == "POST" and path == "/api/v1/hosts":
            if body["name"] in self.hosts:
                request.setResponseCode(409)
                return b'{"error": {"code": "conflict", "message": "exists"}}'
            self.hosts[body["name"]] = body["tags"]
            request.setResponseCode(201)
            return json.dumps({"name": body["name"], "token": self._token(body["name"])}).encode()
        if len(parts) == 6 and parts[5] == "token" and method == "POST":
            return json.dumps({"name": parts[4], "token": self._token(parts[4])}).encode()
        if len(parts) == 6 and parts[5] == "tags" and method == "PUT":
            self.hosts[parts[4]] = body["tags"]
            return json.dumps({"name": parts[4], "tags": body["tags"]}).encode()
        request.setResponseCode(404)
        return b'{"error": {"code": "not_found", "message": "no"}}'


@pytest_twisted.async_yield_fixture
async def api(peer: FakeSwitchboard) -> Any:
    resource = FakeHostsAPI(peer)
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    resource.url = f"http://127.0.0.1:{port.getHost().port}"
    yield resource
    await port.stopListening()


def fleet_args(api: Any, peer: FakeSwitchboard, state: Path, *extra: str) -> list[str]:
    return ["--url", api.url, "--admin-token", ADMIN, "--ws-url", peer.url,
            "--state", str(state), "--no-fsync", "--reconnect-initial", "0.05",
            "--mock-run-time", "0.05", *(f"--mock-stages-{s}=0.01" for s in (
                "starting", "fetching-image", "allocating", "provisioning", "booting")),
            *extra]


@pytest_twisted.ensureDeferred
async def test_fleet_creates_hosts_and_runs_their_supervisors(
        api: Any, peer: FakeSwitchboard, tmp_path: Path) -> None:
    args = parser().parse_args(fleet_args(api, peer, tmp_path, "--count", "3", "--tag", "mock",
                                          "--tag", "arch=x86_64", "--ramp", "0.1"))
    fleet = await start_fleet(reactor, args)
    try:
        conns = [await peer.connection() for _ in range(3)]
        assert {c.host_name for c in conns} == {"fleet-0000", "fleet-0001", "fleet-0002"}
        assert api.hosts["fleet-0001"] == ["mock", "arch=x86_64"]
        await eventually(lambda: fleet.summary()["connected"] == 3)
        ack = await conns[1].start(job(exit_status=5))
        assert ack["ok"]
        events = await conns[1].events_until("terminated")
        assert events[-1]["exit_status"] == 5
        await eventually(lambda: fleet.summary()["jobs_ended"] == 1)
        assert sorted(os.listdir(tmp_path)) == ["fleet-0000", "fleet-0001", "fleet-0002"]
    finally:
        await fleet.stopService()
    for conn in conns:
        await within(conn.closed)

    # Again: the hosts exist, so their tokens are replaced.
    api.requests.clear()
    fleet = await start_fleet(reactor, parser().parse_args(
        fleet_args(api, peer, tmp_path, "--count", "3", "--ramp", "0")))
    try:
        assert ("POST", "/api/v1/hosts/fleet-0002/token") in api.requests
        assert ("PUT", "/api/v1/hosts/fleet-0002/tags") in api.requests
        assert api.hosts["fleet-0002"] == ["mock"]
        await eventually(lambda: fleet.summary()["connected"] == 3)
    finally:
        await fleet.stopService()


@pytest_twisted.ensureDeferred
async def test_fleet_reports_api_errors(api: Any, peer: FakeSwitchboard,
                                        tmp_path: Path) -> None:
    args = parser().parse_args(fleet_args(api, peer, tmp_path, "--count", "2"))
    args.admin_token = "wrong"
    with pytest.raises(FleetError, match="401"):
        await start_fleet(reactor, args)


@pytest_twisted.ensureDeferred
async def test_fleet_reads_the_admin_token_from_a_file(api: Any, peer: FakeSwitchboard,
                                                       tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TREADMILL_TOKEN", raising=False)
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN + "\n")
    argv = fleet_args(api, peer, tmp_path / "state", "--count", "1", "--ramp", "0")
    at = argv.index("--admin-token")
    argv[at:at + 2] = ["--admin-token-file", str(token_file)]
    fleet = await start_fleet(reactor, parser().parse_args(argv))
    try:
        assert (await peer.connection()).host_name == "fleet-0000"
    finally:
        await fleet.stopService()
    del argv[at:at + 2]
    with pytest.raises(SystemExit):  # No token anywhere.
        await start_fleet(reactor, parser().parse_args(argv))


@pytest_twisted.ensureDeferred
async def test_fleet_processes_sharing_a_fleet_take_interleaved_hosts(
        api: Any, peer: FakeSwitchboard, tmp_path: Path) -> None:
    """Process 1 of 3 runs hosts 1, 4, 7: the lowest names (the scheduler's first
    choice) are spread over the processes."""
    fleet = await start_fleet(reactor, parser().parse_args(fleet_args(
        api, peer, tmp_path, "--count", "3", "--first", "1", "--stride", "3", "--ramp", "0")))
    try:
        conns = [await peer.connection() for _ in range(3)]
        assert {c.host_name for c in conns} == {"fleet-0001", "fleet-0004", "fleet-0007"}
        assert sorted(api.hosts) == ["fleet-0001", "fleet-0004", "fleet-0007"]
    finally:
        await fleet.stopService()
    with pytest.raises(SystemExit):
        await start_fleet(reactor, parser().parse_args(fleet_args(
            api, peer, tmp_path, "--count", "1", "--stride", "0")))


def test_ws_url_for() -> None:
    assert ws_url_for("http://127.0.0.1:8080/") == "ws://127.0.0.1:8080"
    assert ws_url_for("https://sb.example.org") == "wss://sb.example.org"
    with pytest.raises(ValueError):
        ws_url_for("ftp://x")


@pytest_twisted.ensureDeferred
async def test_bad_mock_option_is_a_usage_error() -> None:
    args = parser().parse_args(["--url", "http://h", "--admin-token", "t", "--count", "1",
                                "--mock-fail-at", "nowhere"])
    with pytest.raises(SystemExit):
        await start_fleet(reactor, args)


class FleetProcess(Daemon):
    """``python -m treadmill.dev.fleet ARGS`` in a child process."""

    def start(self) -> None:
        self._proto = _Output(self.log)
        argv = [sys.executable, "-m", "treadmill.dev.fleet", *self.args]
        self._transport = reactor.spawnProcess(self._proto, argv[0], argv, env=self.env)


@pytest_twisted.ensureDeferred
async def test_the_fleet_command(api: Any, peer: FakeSwitchboard, tmp_path: Path) -> None:
    fleet = FleetProcess("fleet", fleet_args(api, peer, tmp_path, "--count", "2",
                                             "--report-interval", "0.2"))
    fleet.start()
    try:
        await peer.connection(timeout=30)
        await peer.connection(timeout=30)
        await eventually(lambda: "connected=2" in fleet.output, timeout=10)
        await fleet.signal(signal.SIGINT)
        assert "fleet: 2 supervisors (fleet-0000" in fleet.output, fleet.output
        assert "Traceback" not in fleet.output, fleet.output
    finally:
        await fleet.stop()
