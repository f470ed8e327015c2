"""``tml job ssh`` and ``tml job connect``: reach a job's published services.

A running job's services (a VM's SSH server, a board's console bridge) are
published by its supervisor on one or more rendezvous proxies
(``docs/proxy.md``). The switchboard lists them in the job's ``endpoints``:
``{"service", "proxy", "host", "port"?, "url"?}``: a public TCP port on
``host``, and/or a WebSocket URL whose binary messages carry the bytes.

- ``tml job ssh [-l USER] JOB [SSH ARGS…]`` runs ``ssh -p PORT USER@HOST``
  against the job's ``ssh`` endpoint. With only a WebSocket endpoint it runs
  ``ssh`` with ``-o ProxyCommand="tml job connect JOB ssh --stdio"``. Each job
  gets its own known-hosts entry (``HostKeyAlias=tml-job-<id>``), since a
  proxy port is reused by later jobs: the host keys the guest reported (the
  job's ``ssh_host_keys``) in a temporary known-hosts file, checked with
  ``StrictHostKeyChecking=yes``. ``--proxy-command`` tunnels standard input
  and output instead (``ssh -o ProxyCommand='tml job ssh --proxy-command %h'``),
  and ``--known-hosts`` prints the job's known-hosts lines.
- ``tml job connect JOB SERVICE [--local-port N]`` listens on 127.0.0.1 and
  tunnels every accepted connection through the service's WebSocket URL (or
  its TCP port), with backpressure both ways, until interrupted.
  ``--stdio`` tunnels standard input and output instead (for ``ProxyCommand``).
  An endpoint with ``"auth": "token"`` (a console: a service that does not
  authenticate its users) needs a console token for the job: it is fetched
  from the switchboard (``POST /api/v1/jobs/{id}/console-token``, ``manage``,
  or ``read`` with ``--read-only``) and sent in the ``Authorization`` header.
  While a console is open, a new token is fetched when 80% of the last one's
  lifetime has passed and sent on the WebSocket (a text message: the proxy
  closes a console whose token expired unrenewed). When the switchboard
  refuses it (the right was revoked), tml says so and the console ends when
  the proxy closes it.

The lead registers the handlers under ``tml job`` with
:func:`add_ssh_arguments` and :func:`add_connect_arguments`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.python.failure import Failure

from treadmill.cli.client import ApiError, plain_error
from treadmill.cli.context import EXIT_OK, CommandError, Context, add_job_id, non_negative_int
from treadmill.cli.jobids import HOST_ALIAS_PREFIX
from treadmill.common.splice import (
    MAX_FRAME,
    TUNNEL_SUBPROTOCOL,
    Splice,
    StreamEnd,
    WebSocketEnd,
    client_endpoint,
    join,
    no_delay,
)
from treadmill.common.wsfactory import PreciseClientFactory
from treadmill.common.wsjson import QuietLogger
from treadmill.protocol.proxy import ConsoleCloseCode, parse_proxy_url

__all__ = ["add_connect_arguments", "add_ssh_arguments", "job_connect", "job_ssh"]

SSH_ENV = "TML_SSH"  # the ssh program (default: ssh from PATH)
RENEWAL_RETRY = 10.0  # seconds before a console token renewal that failed is tried again


async def _endpoints(ctx: Context, job_id: str, service: str,
                     job: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    if job is None:
        job = await ctx.api.get("jobs", job_id)
    found = [e for e in job.get("endpoints") or [] if isinstance(e, dict)
             and e.get("service") == service]
    proxy = getattr(ctx.args, "proxy", None)
    if proxy:
        found = [e for e in found if proxy in str(e.get("proxy", ""))]
    if not found:
        names = sorted({str(e.get("service")) for e in job.get("endpoints") or []
                        if isinstance(e, dict)})
        state = job.get("state")
        hint = (f"; it publishes {', '.join(names)}" if names else
                f" (it is {state})" if state and state != "ready" else
                "; it publishes nothing")
        where = f" on a proxy matching {proxy!r}" if proxy else ""
        raise CommandError(f"job {job_id} has no {service} endpoint{where}{hint}")
    return found


# -- tml job ssh -------------------------------------------------------------------------


class _Exit(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone, ProcessTerminated):
            code = reason.value.exitCode
            self.ended.callback(code if code is not None else 128 + (reason.value.signal or 0))
        else:
            self.ended.callback(255)


def host_alias(job_id: str) -> str:
    return f"{HOST_ALIAS_PREFIX}{job_id}"


def known_hosts_lines(names: list[str], keys: list[str]) -> str:
    """``known_hosts`` lines: every name with every key (``TYPE BASE64``)."""
    hosts = ",".join(dict.fromkeys(names))
    return "".join(f"{hosts} {key}\n" for key in keys)


def _host_keys(job: dict[str, Any]) -> list[str]:
    """The job's SSH host keys, only well-formed ``TYPE BASE64`` ones."""
    from treadmill.common import sshkeys

    keys = []
    for text in job.get("ssh_host_keys") or []:
        try:
            keys.append(sshkeys.parse(str(text), comment_allowed=False).line)
        except sshkeys.BadKey:
            continue
    return keys


def ssh_command(ctx: Context, endpoints: list[dict[str, Any]],
                known_hosts: str | None = None) -> list[str]:
    """The ``ssh`` command line for the first usable endpoint; host keys are checked
    strictly, against ``known_hosts`` (a file) when given."""
    a = ctx.args
    program = ctx.env.get(SSH_ENV) or "ssh"
    user = a.user or ctx.env.get("TREADMILL_SSH_USER") or "root"
    argv = [program, "-o", f"HostKeyAlias={host_alias(a.id)}", "-o", "StrictHostKeyChecking=yes"]
    if known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
    tcp = [e for e in endpoints if e.get("port") and e.get("host")]
    if tcp:
        endpoint = tcp[0]
        argv += ["-p", str(endpoint["port"]), f"{user}@{endpoint['host']}"]
    else:
        tml = shlex.join([sys.executable, "-m", "treadmill.cli.main"])
        proxy = ["--proxy", a.proxy] if a.proxy else []
        command = f"{tml} job connect {shlex.join([a.id, a.service, *proxy])} --stdio"
        argv += ["-o", f"ProxyCommand={command}", f"{user}@{host_alias(a.id)}"]
    extra = list(a.ssh_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    return argv + extra


async def job_ssh(ctx: Context) -> int:
    """Run ``ssh`` to the job's SSH endpoint; its exit status is ours."""
    a = ctx.args
    if a.proxy_command or a.known_hosts:
        if a.ssh_args and a.ssh_args != ["--"]:
            raise CommandError("--proxy-command and --known-hosts take no ssh arguments")
        if a.proxy_command:
            return await _proxy_command(ctx)
        job = await ctx.api.get("jobs", a.id)
        keys = _host_keys(job)
        if not keys:
            raise CommandError(f"job {a.id} has not reported an SSH host key")
        text = known_hosts_lines([a.id, host_alias(a.id)], keys)
        return ctx.emit({"known_hosts": text}, lambda d: d["known_hosts"])
    job = await ctx.api.get("jobs", a.id)
    endpoints = await _endpoints(ctx, a.id, a.service, job)
    keys = _host_keys(job)
    if a.print_command:
        argv = ssh_command(ctx, endpoints)
        return ctx.emit({"argv": argv}, lambda d: shlex.join(d["argv"]) + "\n")
    if not keys:
        ctx.note(f"tml: job {a.id} has not reported an SSH host key: ssh checks the host "
                 "against your own known_hosts")
        return await _run_ssh(ctx, ssh_command(ctx, endpoints))
    tmp = tempfile.mkdtemp(prefix="tml-ssh-")  # a few hundred bytes, private (0700)
    try:
        path = os.path.join(tmp, "known_hosts")
        with open(path, "w", encoding="ascii") as f:
            f.write(known_hosts_lines([host_alias(a.id)], keys))
        return await _run_ssh(ctx, ssh_command(ctx, endpoints, path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _proxy_command(ctx: Context) -> int:
    """Tunnel standard input and output to the job's SSH endpoint (``ProxyCommand``)."""
    a = ctx.args
    endpoints = await _endpoints(ctx, a.id, a.service)
    usable = [e for e in endpoints if e.get("url")] or [
        e for e in endpoints if e.get("port") and e.get("host")]
    if not usable:
        raise CommandError(f"job {a.id}'s {a.service} endpoints have neither a URL nor a port")
    return await _stdio(ctx, _Connector(ctx, usable[0]))


async def _run_ssh(ctx: Context, argv: list[str]) -> int:
    program = argv[0]
    if os.sep not in program:
        from twisted.python.procutils import which

        found = which(program)
        if not found:
            raise CommandError(f"{program} not found (install OpenSSH, or set ${SSH_ENV})")
        program = found[0]
    # A ProxyCommand runs tml again: hand it this run's switchboard settings.
    env = dict(ctx.env)
    for name, value in (("TREADMILL_URL", ctx.settings.url),
                        ("TREADMILL_TOKEN", ctx.settings.token),
                        ("TREADMILL_CA_FILE", ctx.settings.ca_file)):
        if value:
            env[name] = value
    protocol = _Exit()
    ctx.reactor.spawnProcess(protocol, program, argv, env=env, childFDs={0: 0, 1: 1, 2: 2})
    return await protocol.ended


def _proxy_option(p: Any) -> None:
    p.add_argument("--proxy", metavar="TEXT", help="use an endpoint on a proxy whose URL "
                   "contains TEXT")


def add_ssh_arguments(p: Any) -> None:
    add_job_id(p)
    p.add_argument("-l", "--user", metavar="USER",
                   help="the user to log in as (default: $TREADMILL_SSH_USER, else root)")
    p.add_argument("--service", default="ssh", metavar="NAME",
                   help="the published service to use (default: ssh)")
    _proxy_option(p)
    p.add_argument("--print-command", action="store_true",
                   help="print the ssh command instead of running it")
    p.add_argument("--proxy-command", action="store_true",
                   help="tunnel standard input and output to the job's SSH endpoint, for "
                   "ssh -o ProxyCommand='tml job ssh --proxy-command %%h' (also scp, rsync)")
    p.add_argument("--known-hosts", action="store_true",
                   help="print known_hosts lines with the host keys the job's guest reported")
    p.add_argument("ssh_args", nargs=argparse.REMAINDER, metavar="SSH_ARG",
                   help="everything after ID goes to ssh (options first, then a remote "
                   "command), as with ssh itself; a leading -- is dropped")


# -- tml job connect ---------------------------------------------------------------------


class _Local(StreamEnd):
    """An accepted local connection (or standard input and output)."""

    def __init__(self, connector: _Connector):
        super().__init__()
        self.connector = connector

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)  # a TCP client's (standard input and output: nothing)
        self.connector.accepted(self)


class _StdioLocal(_Local):
    """Standard input and output: ``StandardIO`` never calls ``connectionLost`` once
    both halves were closed separately (end of file on stdin, stdout closed), so
    this end says so itself."""

    def _maybe_close(self) -> None:
        super()._maybe_close()
        if self._read_closed and self._write_closed:
            self.connectionLost(None)

    def peer_lost(self) -> None:
        super().peer_lost()
        if self._write_closed:  # stdout is closed already: loseConnection ends nothing
            self.connectionLost(None)


class _TunnelClient(WebSocketClientProtocol, WebSocketEnd):
    """The WebSocket to the tunnel's URL, one per local connection."""

    log = QuietLogger(namespace="treadmill.cli.connect.ws")
    local: _Local | None = None
    connector: _Connector | None = None

    def onConnect(self, response: Any) -> None:
        self.half_close = response.protocol == TUNNEL_SUBPROTOCOL

    _renewal: Any = None  # the timer of the next console token renewal

    def onOpen(self) -> None:
        self.end_opened()
        assert self.local is not None and self.connector is not None
        self.connector.joined(join(self.local, self))
        if self.connector.needs_token:
            self._renew_later(self.connector.token_due())

    def _renew_later(self, delay: float) -> None:
        assert self.connector is not None
        self._renewal = self.connector.reactor.callLater(delay, self._renew)

    def _renew(self) -> None:
        """Fetch a new console token and send it on this open console (a text message)."""
        self._renewal = None
        assert self.connector is not None
        Deferred.fromCoroutine(self.connector.console_token()).addCallbacks(
            self._send_renewal, self._not_renewed)

    def _send_renewal(self, token: str) -> None:
        if self.state != self.STATE_OPEN or self.connector is None:
            return
        self.sendMessage(token.encode("ascii"), isBinary=False)
        self._renew_later(self.connector.token_due())

    def _not_renewed(self, failure: Failure) -> None:
        connector = self.connector
        if self.state != self.STATE_OPEN or connector is None:
            return
        error = failure.value
        if isinstance(error, ApiError) and error.status in (401, 403, 404):
            connector.ctx.note(f"tml: the switchboard refused a new console token "
                               f"({plain_error(error)}): the proxy closes this console when "
                               "its token expires")
            return
        connector.ctx.note(f"tml: no new console token yet ({plain_error(error)}); trying "
                           f"again in {RENEWAL_RETRY:g} s")
        self._renew_later(RENEWAL_RETRY)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.end_message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None and renewal.active():
            renewal.cancel()
        if self.local is not None and self.splice is None and self.connector is not None:
            self.connector.failed(self.local, f"WebSocket closed ({code}: {reason})")
        elif self.connector is not None and self.remoteCloseCode in (
                ConsoleCloseCode.UNAUTHORIZED, ConsoleCloseCode.FORBIDDEN):
            self.connector.ctx.note(f"tml: the proxy closed the console "
                                    f"({self.remoteCloseCode}: {self.remoteCloseReason})")
        self.end_closed()


class _Connector:
    """Opens the tunnel leg for each local connection and joins the two."""

    def __init__(self, ctx: Context, endpoint: dict[str, Any]):
        self.ctx = ctx
        self.endpoint = endpoint
        self.reactor = ctx.reactor
        self.splices: set[Splice] = set()
        self.done: Deferred[None] | None = None  # --stdio: fires when the one connection ends
        self.errors = 0
        self.needs_token = endpoint.get("auth") == "token" and bool(endpoint.get("url"))
        self.access = "read" if getattr(ctx.args, "read_only", False) else "manage"
        self._token: tuple[str, float] | None = None  # (token, when to fetch another)
        url = endpoint.get("url")
        if url:
            self.secure, self.host, self.port, _ = parse_proxy_url(url)
            self.factory = PreciseClientFactory(url, protocols=[TUNNEL_SUBPROTOCOL],
                                                  reactor=self.reactor)
            self.factory.protocol = _TunnelClient
            self.factory.setProtocolOptions(maxMessagePayloadSize=4 * MAX_FRAME,
                                            maxFramePayloadSize=4 * MAX_FRAME,
                                            openHandshakeTimeout=15)
            self.url: str | None = url
        else:
            self.secure, self.host, self.port = False, endpoint["host"], endpoint["port"]
            self.url = None

    def describe(self) -> str:
        return self.url or f"{self.host}:{self.port}"

    async def console_token(self) -> str:
        """A console token for the job (``manage``, or ``read`` with ``--read-only``): the
        last one until :meth:`token_due`, then a new one."""
        now = self.reactor.seconds()
        if self._token is not None and now < self._token[1]:
            return self._token[0]
        answer = await self.ctx.api.post("jobs", self.ctx.args.id, "console-token",
                                         body={"access": self.access})
        ttl = float(answer.get("expires_in", 60))
        # Renewed at 80% of its lifetime (a minute before it expires with the default 5
        # minutes); the proxy's grace after that is for a slow renewal, not the schedule.
        self._token = (answer["token"], now + ttl * 0.8)
        return self._token[0]

    def token_due(self) -> float:
        """Seconds until the last console token is due for renewal (0: now)."""
        if self._token is None:
            return 0.0
        return max(0.0, self._token[1] - self.reactor.seconds())

    def accepted(self, local: _Local) -> None:
        if not self.needs_token:
            self._open(local)
            return

        async def with_token() -> None:
            token = await self.console_token()
            # The header, not the URL: the token stays out of access logs.
            self.factory.headers["Authorization"] = f"Bearer {token}"
            self._open(local)

        Deferred.fromCoroutine(with_token()).addErrback(
            lambda f: self.failed(local, f"no console token: {plain_error(f.value)}"))

    def _open(self, local: _Local) -> None:
        endpoint: Any = client_endpoint(self.reactor, self.host, self.port, timeout=15)
        if self.secure:
            from treadmill.common.tls import client_options

            endpoint = wrapClientTLS(client_options(self.host, self.ctx.settings.ca_file),
                                     endpoint)
        if self.url is not None:
            protocol = self.factory.buildProtocol(None)
            protocol.local = local
            protocol.connector = self
        else:
            protocol = _Remote(self, local)
        connectProtocol(endpoint, protocol).addErrback(
            lambda f: self.failed(local, plain_error(f.value)))

    def joined(self, splice: Splice) -> None:
        self.splices.add(splice)
        splice.on_closed = self._closed

    def failed(self, local: _Local, why: str) -> None:
        self.errors += 1
        self.ctx.note(f"tml: cannot reach {self.describe()}: {why}")
        if not local.lost:
            local.abort()
        if self.done is not None and not self.done.called:
            self.done.callback(None)

    def _closed(self, splice: Splice) -> None:
        self.splices.discard(splice)
        if self.done is not None and not self.done.called:
            self.done.callback(None)


class _Remote(StreamEnd):
    """The TCP leg when the endpoint has a public port but no WebSocket URL."""

    def __init__(self, connector: _Connector, local: _Local):
        super().__init__()
        self.connector = connector
        self.local = local

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)
        self.connector.joined(join(self.local, self))


async def job_connect(ctx: Context) -> int:
    """Forward a local port (or standard input and output) to a job's service."""
    a = ctx.args
    endpoints = await _endpoints(ctx, a.id, a.service)
    usable = [e for e in endpoints if e.get("url")] if not a.tcp else []
    usable = usable or [e for e in endpoints if e.get("port") and e.get("host")]
    if not usable:
        if a.tcp and any(e.get("auth") == "token" for e in endpoints):
            raise CommandError(f"job {a.id}'s {a.service} has no public port: it does not "
                               "authenticate its users, so it needs a console token (drop "
                               "--tcp)")
        raise CommandError(f"job {a.id}'s {a.service} endpoints have neither a URL nor a port")
    connector = _Connector(ctx, usable[0])
    if connector.needs_token:
        await connector.console_token()  # refused (403/404) before listening
    if a.stdio:
        return await _stdio(ctx, connector)
    factory = Factory.forProtocol(lambda: _Local(connector))
    factory.noisy = False
    try:
        port = await TCP4ServerEndpoint(ctx.reactor, a.local_port, backlog=128,
                                        interface="127.0.0.1").listen(factory)
    except Exception as e:
        raise CommandError(f"cannot listen on 127.0.0.1:{a.local_port}: {e}") from None
    bound = port.getHost().port
    ctx.note(f"tml: 127.0.0.1:{bound} -> {a.service} of job {a.id} via {connector.describe()}"
             " (Ctrl-C to stop)")
    if ctx.json:
        from treadmill.cli import output

        output.print_json(ctx.stdout, {"local_port": bound, "service": a.service,
                                       "job": a.id, "endpoint": usable[0]})
    forever: Deferred[None] = Deferred()
    try:
        await forever
    except CancelledError:
        pass
    finally:
        await port.stopListening()
        for splice in list(connector.splices):
            splice.close()
    return EXIT_OK


async def _stdio(ctx: Context, connector: _Connector) -> int:
    from twisted.internet.stdio import StandardIO

    connector.done = Deferred()
    local = _StdioLocal(connector)
    StandardIO(local, reactor=ctx.reactor)
    await connector.done
    return 1 if connector.errors else EXIT_OK


def add_connect_arguments(p: Any) -> None:
    add_job_id(p)
    p.add_argument("service", metavar="SERVICE", help="a service the job publishes, e.g. ssh")
    p.add_argument("--local-port", type=non_negative_int, default=0, metavar="N",
                   help="the local port to listen on, on 127.0.0.1 (default: any free port)")
    p.add_argument("--stdio", action="store_true",
                   help="tunnel standard input and output (for ssh -o ProxyCommand=...)")
    p.add_argument("--tcp", action="store_true",
                   help="use the public TCP port rather than the WebSocket URL")
    p.add_argument("--read-only", action="store_true",
                   help="a console: ask only for read access (watch; what you type is "
                   "dropped by the proxy)")
    _proxy_option(p)
