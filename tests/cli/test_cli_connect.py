"""``tml job ssh`` and ``tml job connect`` against a crafted job and a real proxy on loopback.

Until the switchboard lists ``endpoints`` in ``GET /api/v1/jobs/{id}``, the
handlers run with a :class:`Context` whose API client returns a job made here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol

from tests.proxy.support import (
    Keys,
    Running,
    Transfer,
    TransferService,
    echo_client,
    echo_once,
    expected_digest,
    keys_fixture,  # noqa: F401 (the keys fixture)
    new_job,
    proxy_fixture,  # noqa: F401 (the proxy fixture)
    tcp_transfer,
)
from tests.util.ssh import new_ssh_public_key
from tests.util.waiting import eventually, sleep
from treadmill.cli.commands.connect import (
    add_connect_arguments,
    add_ssh_arguments,
    job_connect,
    job_ssh,
    ssh_command,
)
from treadmill.cli.config import Settings
from treadmill.cli.context import CommandError, Context
from treadmill.common.splice import WebSocketEnd
from treadmill.proxy.legs import TunnelSocket
from treadmill.supervisor.echo import listen_echo
from treadmill.supervisor.exposure import ExposureManager

MiB = 1024 * 1024
ROOT = Path(__file__).parents[2]


class FakeApi:
    """The part of ``ApiClient`` the handlers use; ``console_token(access)`` answers
    ``POST .../console-token`` (as the switchboard would, or raises its refusal)."""

    def __init__(self, job: dict[str, Any], console_token: Any = None):
        self.job = job
        self.console_token = console_token
        self.calls: list[tuple[str, ...]] = []

    async def get(self, *segments: str, params: Any = None) -> Any:
        self.calls.append(segments)
        return self.job

    async def post(self, *segments: str, body: Any = None, auth: bool = True) -> Any:
        self.calls.append((*segments, json.dumps(body)))
        assert segments[-1] == "console-token" and self.console_token is not None
        return self.console_token(body["access"])


def context(parser_setup: Any, argv: list[str], job: dict[str, Any],
            env: dict[str, str] | None = None, console_token: Any = None) -> Context:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser_setup(parser)
    args = parser.parse_args(argv)
    settings = Settings(url="http://127.0.0.1:1", token="tmt_secret", ca_file=None,
                        config_path=Path("/nonexistent"))
    return Context(reactor, args, io.StringIO(), io.StringIO(), io.StringIO(), env or {},
                   settings, FakeApi(job, console_token))  # type: ignore[arg-type]


def a_job(endpoints: list[dict[str, Any]], job_id: str = "job-1") -> dict[str, Any]:
    return {"id": job_id, "state": "ready", "endpoints": endpoints}


TCP = {"service": "ssh", "proxy": "wss://p1.example", "host": "p1.example", "port": 40001,
       "url": "wss://p1.example/v1/tunnels/abcdefghijklmnopqrstuvwx"}
WS_ONLY = {"service": "ssh", "proxy": "wss://p2.example",
           "url": "wss://p2.example/v1/tunnels/abcdefghijklmnopqrstuvwx"}


# -- tml job ssh -------------------------------------------------------------------------


def test_the_ssh_command_for_a_tcp_endpoint() -> None:
    ctx = context(add_ssh_arguments, ["-l", "alice", "job-1", "-v", "uptime"],
                  a_job([TCP]))
    assert ssh_command(ctx, [TCP]) == ["ssh", "-o", "HostKeyAlias=tml-job-job-1",
                                       "-o", "StrictHostKeyChecking=yes", "-p",
                                       "40001", "alice@p1.example", "-v", "uptime"]


def test_the_ssh_command_for_a_websocket_endpoint_uses_a_proxy_command() -> None:
    ctx = context(add_ssh_arguments, ["job-1"], a_job([WS_ONLY]),
                  env={"TREADMILL_SSH_USER": "tester", "TML_SSH": "/opt/ssh"})
    argv = ssh_command(ctx, [WS_ONLY])
    assert argv[0] == "/opt/ssh" and argv[-1] == "tester@tml-job-job-1"
    proxy_command = argv[argv.index("-o", 5) + 1]
    assert proxy_command.startswith("ProxyCommand=")
    assert proxy_command.endswith("-m treadmill.cli.main job connect job-1 ssh --stdio")


@pytest_twisted.ensureDeferred
async def test_job_ssh_runs_ssh_and_returns_its_status(tmp_path: Path) -> None:
    fake = tmp_path / "ssh"
    record = tmp_path / "argv.json"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "known = [a.split('=', 1)[1] for a in sys.argv if "
                    "a.startswith('UserKnownHostsFile=')]\n"
                    "text = open(known[0]).read() if known else None\n"
                    f"json.dump([sys.argv[1:], os.environ.get('TREADMILL_TOKEN'), text], "
                    f"open({str(record)!r}, 'w'))\nsys.exit(7)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    other = {**TCP, "service": "console", "port": 40002}
    host_key = new_ssh_public_key()
    job = {**a_job([other, TCP]), "ssh_host_keys": ["ssh-rsa AAAA", host_key]}
    ctx = context(add_ssh_arguments, ["job-1", "--", "uname", "-a"], job,
                  env={"TML_SSH": str(fake), "PATH": os.environ["PATH"]})
    assert await job_ssh(ctx) == 7
    argv, token, known_hosts = json.loads(record.read_text())
    path = argv[5].split("=", 1)[1]
    assert argv == ["-o", "HostKeyAlias=tml-job-job-1", "-o", "StrictHostKeyChecking=yes",
                    "-o", f"UserKnownHostsFile={path}", "-o", "GlobalKnownHostsFile=/dev/null",
                    "-p", "40001", "root@p1.example", "uname", "-a"]
    assert known_hosts == f"tml-job-job-1 {host_key}\n"  # only the well-formed key
    assert not os.path.exists(path)  # removed once ssh ended
    assert token == "tmt_secret"  # for a ProxyCommand's tml
    assert ctx.api.calls == [("jobs", "job-1")]  # type: ignore[attr-defined]

    # Without a reported host key, ssh checks against the user's own known_hosts,
    # still strictly: never trust on first use.
    ctx = context(add_ssh_arguments, ["job-1"], a_job([TCP]),
                  env={"TML_SSH": str(fake), "PATH": os.environ["PATH"]})
    assert await job_ssh(ctx) == 7
    argv, _, known_hosts = json.loads(record.read_text())
    assert argv == ["-o", "HostKeyAlias=tml-job-job-1", "-o", "StrictHostKeyChecking=yes",
                    "-p", "40001", "root@p1.example"]
    assert "has not reported an SSH host key" in ctx.stderr.getvalue()


@pytest_twisted.ensureDeferred
async def test_job_ssh_known_hosts() -> None:
    host_key = new_ssh_public_key()
    ctx = context(add_ssh_arguments, ["--known-hosts", "job-1"],
                  {**a_job([TCP]), "ssh_host_keys": [host_key]})
    assert await job_ssh(ctx) == 0
    assert ctx.stdout.getvalue() == f"job-1,tml-job-job-1 {host_key}\n"
    ctx = context(add_ssh_arguments, ["--known-hosts", "job-1"], a_job([TCP]))
    with pytest.raises(CommandError, match="not reported an SSH host key"):
        await job_ssh(ctx)
    ctx = context(add_ssh_arguments, ["--proxy-command", "job-1", "uname"], a_job([TCP]))
    with pytest.raises(CommandError, match="take no ssh arguments"):
        await job_ssh(ctx)


@pytest_twisted.ensureDeferred
async def test_job_ssh_print_command() -> None:
    ctx = context(add_ssh_arguments, ["--print-command", "--proxy", "p1", "job-1"],
                  a_job([WS_ONLY, TCP]))
    assert await job_ssh(ctx) == 0
    assert ctx.stdout.getvalue() == ("ssh -o HostKeyAlias=tml-job-job-1 "
                                     "-o StrictHostKeyChecking=yes -p 40001 root@p1.example\n")
    ctx = context(add_ssh_arguments, ["--print-command", "--json", "job-1"], a_job([TCP]))
    assert await job_ssh(ctx) == 0
    assert json.loads(ctx.stdout.getvalue()) == {"argv": [
        "ssh", "-o", "HostKeyAlias=tml-job-job-1", "-o", "StrictHostKeyChecking=yes", "-p",
        "40001", "root@p1.example"]}


@pytest.mark.parametrize(("job", "argv", "words"), [
    (a_job([]), [], "has no ssh endpoint; it publishes nothing"),
    ({"id": "job-1", "state": "queued"}, [], "(it is queued)"),
    (a_job([{**TCP, "service": "console"}]), [], "it publishes console"),
    (a_job([TCP]), ["--proxy", "elsewhere"], "on a proxy matching 'elsewhere'"),
])
@pytest_twisted.ensureDeferred
async def test_job_ssh_without_an_endpoint(job: dict[str, Any], argv: list[str],
                                           words: str) -> None:
    ctx = context(add_ssh_arguments, [*argv, "job-1"], job)
    with pytest.raises(CommandError) as caught:
        await job_ssh(ctx)
    assert words in str(caught.value)


# -- tml job connect ---------------------------------------------------------------------


async def published(proxy: Running, keys: Keys, services: dict[str, Any]
                    ) -> tuple[ExposureManager, list[dict[str, Any]]]:
    job = new_job()
    manager = ExposureManager(reactor, job, [{"url": proxy.ws, "token": keys.token(job)}],
                              services, reconnect_initial=0.05)
    manager.start()
    return manager, await manager.published()


@contextlib.asynccontextmanager
async def published_echo(proxy: Running, keys: Keys, websocket: bool = True
                         ) -> AsyncIterator[tuple[ExposureManager, list[dict[str, Any]]]]:
    """An echo server published on ``proxy`` as service ``echo`` (also over the WebSocket
    path unless ``websocket`` is false): (the manager, the endpoints); both stopped after."""
    echo = listen_echo(reactor)
    services = {"echo": ("127.0.0.1", echo.getHost().port, True) if websocket
                else ("127.0.0.1", echo.getHost().port)}
    manager, endpoints = await published(proxy, keys, services)
    try:
        yield manager, endpoints
    finally:
        await manager.close()
        await echo.stopListening()


async def start_connect(argv: list[str], job: dict[str, Any], console_token: Any = None
                        ) -> tuple[Deferred[int], int, Context]:
    ctx = context(add_connect_arguments, [*argv, "--json"], job, console_token=console_token)
    running = Deferred.fromCoroutine(job_connect(ctx))
    await eventually(lambda: ctx.stdout.getvalue() or running.called)
    assert not running.called, ctx.stderr.getvalue()
    return running, json.loads(ctx.stdout.getvalue())["local_port"], ctx


@contextlib.asynccontextmanager
async def connecting(argv: list[str], job: dict[str, Any], console_token: Any = None
                     ) -> AsyncIterator[tuple[int, Context]]:
    """``tml job connect ARGV`` running (:func:`start_connect`): (its local port, its
    context); interrupted after."""
    running, port, ctx = await start_connect(argv, job, console_token)
    try:
        yield port, ctx
    finally:
        running.cancel()
        await running


@pytest_twisted.ensureDeferred
async def test_connect_tunnels_local_connections_through_the_websocket(
        proxy: Running, keys: Keys) -> None:
    size = 32 * MiB
    service = TransferService(lambda: Transfer(size, seed=6))
    manager, endpoints = await published(proxy, keys, {"data": ("127.0.0.1",
                                                                service.listen(), True)})
    running, port, ctx = await start_connect(["job-1", "data"], a_job(endpoints))
    try:
        assert "-> data of job job-1 via ws://" in ctx.stderr.getvalue()
        outcome = await tcp_transfer(port, Transfer(size, seed=5))
        served = await service.outcomes[0]
        assert outcome.received == served.sent == expected_digest(size, 6)
        assert served.received == outcome.sent == expected_digest(size, 5)
        # Through the WebSocket path, not the TCP port.
        tunnel = proxy.registry.sessions[manager.job_id].tunnels["data"]
        assert tunnel.accepted == 1
    finally:
        running.cancel()
        assert await running == 0
        await manager.close()
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_connect_serves_many_connections_at_once(proxy: Running, keys: Keys) -> None:
    async with published_echo(proxy, keys) as (_, endpoints):
        async with connecting(["job-1", "echo"], a_job(endpoints)) as (port, _):
            clients = await gatherResults([echo_client(port) for _ in range(50)])
            for i, client in enumerate(clients):
                client.transport.write(b"%d;" % i * 50)
            answers = await gatherResults([c.wait_for(len(b"%d;" % i * 50), timeout=10)
                                           for i, c in enumerate(clients)])
            assert answers == [b"%d;" % i * 50 for i in range(len(clients))]
            for client in clients:
                client.transport.loseConnection()


def _tcp_connections() -> list[Any]:
    """The reactor's TCP connections (this process's: the proxy's, tml's, the tests')."""
    return [d for d in reactor.getReaders() if isinstance(d, tcp.Connection)]


def _no_delay(transport: Any) -> bool:
    handle = transport.getHandle()
    return bool(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest_twisted.ensureDeferred
async def test_tunnel_websockets_turn_nagle_off_at_both_ends(proxy: Running,
                                                             keys: Keys) -> None:
    """Both ends of a tunnel WebSocket (the proxy's, ``tml``'s) set ``TCP_NODELAY``.
    Autobahn's own attempt runs before it copies the factory's ``tcpNoDelay``, so it
    never happened: with Nagle on, ssh's short tail writes through ``--proxy-command``
    waited for delayed acks (scp of 10 MB up to a devstack VM: 20.5 s, not 2 s)."""
    async with published_echo(proxy, keys) as (manager, endpoints):
        async with connecting(["job-1", "echo"], a_job(endpoints)) as (port, _):
            client = await echo_client(port)
            try:
                client.transport.write(b"ping")
                assert await client.wait_for(4, timeout=10) == b"ping"
                [splice] = proxy.registry.sessions[manager.job_id].tunnels["echo"].splices
                [leg] = [end for end in (splice.a, splice.b) if isinstance(end, TunnelSocket)]
                assert _no_delay(leg.transport)  # the proxy's end
                peer = leg.transport.getPeer()
                [tml_end] = [d for d in _tcp_connections() if d.getHost().port == peer.port]
                wrapped = getattr(tml_end.protocol, "_wrappedProtocol", tml_end.protocol)
                assert isinstance(wrapped, WebSocketEnd)
                assert _no_delay(tml_end)  # tml's end
                # tml's local leg: the connection it accepted from the client.
                [local] = [d for d in _tcp_connections()
                           if d.getPeer().port == client.transport.getHost().port]
                assert _no_delay(local)
            finally:
                client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_connect_over_the_tcp_port_turns_nagle_off(proxy: Running, keys: Keys) -> None:
    """With ``--tcp`` (or an endpoint without a URL, as ``--proxy-command`` uses), tml's
    leg to the proxy's public port is plain TCP: Nagle off there too."""
    async with published_echo(proxy, keys) as (manager, _endpoints):
        ssh_like = [dict(e, url=None) for e in _endpoints]  # a port only
        async with connecting(["job-1", "echo", "--tcp"], a_job(ssh_like)) as (port, _):
            client = await echo_client(port)
            try:
                client.transport.write(b"ping")
                assert await client.wait_for(4, timeout=10) == b"ping"
                [splice] = proxy.registry.sessions[manager.job_id].tunnels["echo"].splices
                public = next(end for end in (splice.a, splice.b) if end.transport.getHost()
                              .port == _endpoints[0]["port"])
                peer = public.transport.getPeer().port
                [remote] = [d for d in _tcp_connections() if d.getHost().port == peer]
                assert _no_delay(remote)
            finally:
                client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_connect_over_the_tcp_port(proxy: Running, keys: Keys) -> None:
    async with published_echo(proxy, keys) as (_, endpoints):
        async with connecting(["job-1", "echo", "--tcp"], a_job(endpoints)) as (port, _):
            assert await echo_once(port, b"plain tcp") == b"plain tcp"


@pytest_twisted.ensureDeferred
async def test_connect_says_when_the_tunnel_is_gone(proxy: Running, keys: Keys) -> None:
    gone = {"service": "ssh", "proxy": proxy.ws, "host": "127.0.0.1",
            "url": proxy.ws + "/v1/tunnels/" + "x" * 32}
    async with connecting(["job-1", "ssh"], a_job([gone])) as (port, ctx):
        client = await echo_client(port)
        await client.lost
        await eventually(lambda: "cannot reach" in ctx.stderr.getvalue())


class _Pipe(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


STDIO_RUNNER = """
import argparse, io, json, sys
from pathlib import Path
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from treadmill.cli.commands.connect import add_connect_arguments, job_connect
from treadmill.cli.config import Settings
from treadmill.cli.context import Context

class Api:
    async def get(self, *segments, params=None):
        return json.loads(sys.argv[1])

def main(reactor):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    add_connect_arguments(parser)
    args = parser.parse_args(["job-1", "echo", "--stdio"])
    ctx = Context(reactor, args, sys.stdout, sys.stderr, sys.stdin, {},
                  Settings("http://127.0.0.1:1", None, None, Path("/x")), Api())
    return Deferred.fromCoroutine(job_connect(ctx))

react(main)
"""


@pytest_twisted.ensureDeferred
async def test_connect_stdio_for_ssh_proxy_command(proxy: Running, keys: Keys) -> None:
    async with published_echo(proxy, keys) as (_, endpoints):
        pipe = _Pipe()
        process = reactor.spawnProcess(
            pipe, sys.executable, [sys.executable, "-c", STDIO_RUNNER,
                                   json.dumps(a_job(endpoints))],
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        payload = os.urandom(256 * 1024)
        process.write(payload)
        await eventually(lambda: len(pipe.out) >= len(payload) or pipe.ended.called,
                         timeout=20)
        process.closeStdin()  # end of file: the tunnel closes, the echo service too
        ended = pipe.ended
        ended.addTimeout(10, reactor)
        try:
            status = await ended
        except Exception:
            raise AssertionError(f"out {len(pipe.out)}: {pipe.err.decode()}") from None
        assert status == 0, pipe.err.decode()
        assert pipe.out == payload


@pytest_twisted.ensureDeferred
async def test_job_ssh_proxy_command_tunnels_stdio(proxy: Running, keys: Keys) -> None:
    """``tml job ssh --proxy-command JOB``: what ssh, scp and rsync run as ProxyCommand."""
    runner = STDIO_RUNNER.replace("add_connect_arguments, job_connect",
                                  "add_ssh_arguments, job_ssh").replace(
        "add_connect_arguments(parser)", "add_ssh_arguments(parser)").replace(
        '["job-1", "echo", "--stdio"]', '["--proxy-command", "--service", "echo", "job-1"]'
    ).replace("job_connect(ctx)", "job_ssh(ctx)")
    assert "job_connect" not in runner and '"--proxy-command"' in runner
    async with published_echo(proxy, keys) as (_, endpoints):
        pipe = _Pipe()
        process = reactor.spawnProcess(
            pipe, sys.executable, [sys.executable, "-c", runner, json.dumps(a_job(endpoints))],
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        payload = os.urandom(256 * 1024)
        process.write(payload)
        await eventually(lambda: len(pipe.out) >= len(payload) or pipe.ended.called,
                         timeout=20)
        process.closeStdin()
        ended = pipe.ended
        ended.addTimeout(10, reactor)
        assert await ended == 0, pipe.err.decode()
        assert pipe.out == payload


# -- consoles: endpoints that need a console token ---------------------------------------


class Issuer:
    """Signs console tokens as the switchboard does for a user holding ``held``."""

    def __init__(self, keys: Keys, job: str, held: tuple[str, ...] = ("read", "manage")):
        self.keys = keys
        self.job = job
        self.held = held
        self.asked: list[str] = []

    def __call__(self, access: str) -> dict[str, Any]:
        self.asked.append(access)
        if access not in self.held:
            raise CommandError(f"403: you lack {access} on job {self.job}")
        actions = ("read", "manage") if access == "manage" else ("read",)
        return {"token": self.keys.token(self.job, actions=actions, subject="alice"),
                "access": access, "expires_in": 300, "endpoints": []}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("read_only", [False, True])
async def test_connect_fetches_a_console_token(proxy: Running, keys: Keys,
                                               read_only: bool) -> None:
    async with published_echo(proxy, keys, websocket=False) as (manager, endpoints):
        [endpoint] = endpoints
        assert endpoint["auth"] == "token" and "port" not in endpoint
        issuer = Issuer(keys, manager.job_id)
        argv = ["job-1", "echo", *(["--read-only"] if read_only else [])]
        async with connecting(argv, a_job(endpoints), issuer) as (port, ctx):
            client = await echo_client(port)
            client.transport.write(b"typed")
            if read_only:  # watching: what is typed never reaches the echo
                await eventually(lambda: proxy.registry.counts["console_input_dropped"] > 0)
                await sleep(0.1)
                assert client.data == b""
            else:
                assert await client.wait_for(5) == b"typed"
            client.transport.loseConnection()
            assert issuer.asked == ["read" if read_only else "manage"]  # one token, reused
            assert proxy.registry.counts["console_read" if read_only else "console_manage"] == 1
            second = await echo_client(port)  # another connection reuses the token
            await eventually(lambda: proxy.registry.counts["spliced"] == 2)
            second.transport.loseConnection()
            assert len(issuer.asked) == 1
            assert "Bearer" not in ctx.stderr.getvalue() + ctx.stdout.getvalue()


@pytest_twisted.ensureDeferred
async def test_connect_without_the_privilege_gets_no_console(proxy: Running,
                                                             keys: Keys) -> None:
    async with published_echo(proxy, keys, websocket=False) as (manager, endpoints):
        ctx = context(add_connect_arguments, ["job-1", "echo"], a_job(endpoints),
                      console_token=Issuer(keys, manager.job_id, held=("read",)))
        with pytest.raises(CommandError, match="lack manage"):
            await job_connect(ctx)
        ctx = context(add_connect_arguments, ["job-1", "echo", "--tcp"], a_job(endpoints))
        with pytest.raises(CommandError, match="no public port"):
            await job_connect(ctx)
        assert proxy.registry.counts["spliced"] == 0
