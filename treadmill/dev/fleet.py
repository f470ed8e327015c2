"""Many mock supervisors in one process, for load tests.

    python -m treadmill.dev.fleet --url http://127.0.0.1:8080 \\
        --admin-token-file PATH --count 1000 [--prefix fleet-] [--tag mock] \\
        [--state DIR] [--mock-run-time 5 ...]

It creates hosts ``PREFIX0000`` … (from ``--first``, every ``--stride``-th
number) through the switchboard API (or, for hosts
that already exist, replaces their tokens with ``POST
/api/v1/hosts/{name}/token`` and sets their tags), then runs one supervisor
per host (link, runner and mock driver, each with its own state directory
under ``--state``) in this one process and reactor, until SIGINT or SIGTERM.
Starts are spread over ``--ramp`` seconds so that a thousand supervisors do not
connect in the same millisecond. Every ``--report-interval`` seconds it
prints how many are connected and how many run a job.

The scheduler gives a job the free host first in name order, so at a low job
rate the lowest numbers run every job: several fleet processes sharing one
fleet take interleaved numbers (``--first I --stride N``) to share its jobs too,
as separate machines would.

Per supervisor it keeps one WebSocket, a few small objects and no console
buffer (``--console-buffer 0``); state files are ``fsync``-ed unless
``--no-fsync`` (a load test of the switchboard rarely needs the supervisors'
durability).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredSemaphore, FirstError, gatherResults
from twisted.internet.task import LoopingCall, react
from twisted.logger import Logger, LogLevel, globalLogBeginner
from twisted.web.client import Agent, HTTPConnectionPool

from treadmill.common.gcpolicy import FreezePolicy
from treadmill.common.logging import build_text
from treadmill.common.tls import client_policy
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers.mock import MOCK_SETTINGS
from treadmill.supervisor.service import SupervisorService

__all__ = ["Fleet", "main", "parser", "provision_hosts", "start_fleet", "ws_url_for"]

log = Logger()


class FleetError(RuntimeError):
    """The switchboard refused to create a host or its token."""


def ws_url_for(http_url: str) -> str:
    """The WebSocket base URL of a switchboard HTTP URL (http -> ws, https -> wss)."""
    parts = urlsplit(http_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"expected an http:// or https:// URL, got {http_url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


async def provision_hosts(reactor: Any, url: str, admin_token: str, names: Sequence[str],
                          tags: list[str], *, ca_file: str | None = None,
                          concurrency: int = 16) -> dict[str, str]:
    """Create each host (or give an existing one a new token); ``{name: token}``."""
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = concurrency
    client = HTTPClient(Agent(reactor, contextFactory=client_policy(ca_file), pool=pool))
    headers = {"authorization": f"Bearer {admin_token}", "content-type": "application/json"}
    base = url.rstrip("/") + "/api/v1/hosts"

    async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        response = await client.request(method, base + path, data=data, headers=headers)
        content = await response.content()
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content.decode("utf-8", "replace")
        return response.code, parsed

    async def one(name: str) -> tuple[str, str]:
        code, body = await call("POST", "", {"name": name, "tags": tags,
                                             "description": "treadmill fleet (load test)"})
        if code == 409:
            code, body = await call("POST", f"/{quote(name, safe='')}/token")
            if code == 200:
                tag_code, tag_body = await call("PUT", f"/{quote(name, safe='')}/tags",
                                                {"tags": tags})
                if tag_code != 200:
                    raise FleetError(f"cannot set the tags of {name}: {tag_code} {tag_body}")
        if code not in (200, 201) or not isinstance(body, dict) or "token" not in body:
            raise FleetError(f"cannot create host {name}: {code} {body}")
        return name, body["token"]

    limit = DeferredSemaphore(concurrency)
    try:
        results = await gatherResults(
            [limit.run(lambda n=name: Deferred.fromCoroutine(one(n))) for name in names],
            consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
    finally:
        await pool.closeCachedConnections()
    return dict(results)


class Fleet(MultiService):
    """One SupervisorService per host, started over ``ramp`` seconds."""

    def __init__(self, reactor: Any, configs: list[SupervisorConfig], *, ramp: float = 0.0):
        super().__init__()
        self.reactor = reactor
        self.ramp = ramp
        self.supervisors = [SupervisorService(reactor, config) for config in configs]
        for supervisor in self.supervisors:
            supervisor.setName(supervisor.config.name)
        self._pending: list[Any] = []

    def startService(self) -> None:
        super().startService()
        step = self.ramp / max(1, len(self.supervisors))
        for i, supervisor in enumerate(self.supervisors):
            if step <= 0:
                supervisor.setServiceParent(self)
            else:
                self._pending.append(self.reactor.callLater(i * step, self._add, supervisor))

    def _add(self, supervisor: SupervisorService) -> None:
        if self.running:
            supervisor.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()
        return super().stopService()  # type: ignore[no-any-return]

    def summary(self) -> dict[str, int]:
        started = [s for s in self.supervisors if s.running]
        return {
            "supervisors": len(self.supervisors),
            "started": len(started),
            "connected": sum(1 for s in started if s.link.session is not None),
            "running_jobs": sum(1 for s in started if s.runner.status() is not None),
            "pending_events": sum(len(s.runner.pending_events) for s in started),
            "jobs_ended": sum(len(s.runner.ended) for s in started),
        }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m treadmill.dev.fleet",
        description="Run many mock supervisors in one process (load tests).")
    p.add_argument("--url", required=True, help="switchboard HTTP URL (http:// or https://)")
    p.add_argument("--admin-token-file", metavar="PATH",
                   help="file holding an admin API token (or TREADMILL_TOKEN)")
    p.add_argument("--admin-token", help=argparse.SUPPRESS)  # Leaks through argv: warned.
    p.add_argument("--count", type=int, required=True, help="number of hosts and supervisors")
    p.add_argument("--prefix", default="fleet-", help="host name prefix [fleet-]")
    p.add_argument("--first", type=int, default=0, help="number of the first host [0]")
    p.add_argument("--stride", type=int, default=1,
                   help="step between host numbers: process I of N takes --first I "
                        "--stride N [1]")
    p.add_argument("--tag", action="append", dest="tags",
                   help="host tag (repeatable) [mock]")
    p.add_argument("--state", default="fleet-state",
                   help="directory of the state directories [./fleet-state]")
    p.add_argument("--ws-url", help="WebSocket base URL if not derived from --url")
    p.add_argument("--ca-file", help="CA certificates (PEM) for https:// and wss://")
    p.add_argument("--ramp", type=float, default=None,
                   help="seconds over which to spread the starts [count / 200]")
    p.add_argument("--concurrency", type=int, default=16, help="parallel API requests [16]")
    p.add_argument("--reconnect-initial", type=float, default=1.0)
    p.add_argument("--reconnect-max", type=float, default=60.0)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--heartbeat-timeout", type=float, default=10.0)
    p.add_argument("--console-buffer", type=int, default=0,
                   help="console bytes kept per supervisor [0]")
    p.add_argument("--no-fsync", action="store_true", help="do not fsync state files")
    p.add_argument("--io-threads", type=int, default=8, help="threads for state-file I/O [8]")
    p.add_argument("--report-interval", type=float, default=10.0,
                   help="seconds between status lines (0: none) [10]")
    p.add_argument("--verbose", "-v", action="store_true", help="log at info level")
    mock = p.add_argument_group("mock driver (defaults for every job)")
    for setting in MOCK_SETTINGS:
        default = False if setting.key == "mock.echo" else setting.default
        mock.add_argument(f"--{setting.flag}", dest=setting.key, metavar="VALUE",
                          help=f"{setting.help} [{default}]")
    return p


def _mock_values(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, Any]:
    """The mock driver's ``mock.*`` values given on the command line (checked)."""
    # A fleet has no proxies to publish on: no echo port per host unless asked.
    values: dict[str, Any] = {"mock.echo": False}
    for setting in MOCK_SETTINGS:
        given = getattr(args, setting.key)
        if given is None:
            continue
        try:
            values[setting.key] = setting.kind(given)
        except ValueError as e:
            p.error(f"--{setting.flag}: {e}")
    return values


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < wanted:
        log.warn("Only {limit} file descriptors allowed; {wanted} wanted (ulimit -n)",
                 limit=target, wanted=wanted)


def _admin_token(args: argparse.Namespace, p: argparse.ArgumentParser) -> str:
    """The admin token from ``--admin-token-file``, ``$TREADMILL_TOKEN`` or (with a
    warning: other local users see argv) ``--admin-token``."""
    if args.admin_token_file:
        try:
            with open(args.admin_token_file, encoding="utf-8") as f:
                token = f.read(4096).strip()
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--admin-token-file: {getattr(e, 'strerror', None) or e}")
        if not token:
            p.error("--admin-token-file: the file is empty")
        return token
    if args.admin_token:
        log.warn("--admin-token shows the token to every local user (the process list); "
                 "use --admin-token-file or TREADMILL_TOKEN")
        return args.admin_token
    if os.environ.get("TREADMILL_TOKEN"):
        return os.environ["TREADMILL_TOKEN"].strip()
    p.error("--admin-token-file (or TREADMILL_TOKEN) is required")


async def start_fleet(reactor: Any, args: argparse.Namespace,
                      p: argparse.ArgumentParser | None = None) -> Fleet:
    """Provision the hosts and start their supervisors (not yet connected)."""
    p = p or parser()
    if args.count < 1:
        p.error("--count must be at least 1")
    if args.stride < 1:
        p.error("--stride must be at least 1")
    token = _admin_token(args, p)
    mock = _mock_values(args, p)
    try:
        ws_url = args.ws_url or ws_url_for(args.url)
    except ValueError as e:
        p.error(str(e))
    tags = args.tags or ["mock"]
    names = [f"{args.prefix}{args.first + i * args.stride:04d}" for i in range(args.count)]
    _raise_fd_limit(args.count * 2 + 256)
    reactor.suggestThreadPoolSize(max(1, args.io_threads))
    tokens = await provision_hosts(reactor, args.url, token, names, tags,
                                   ca_file=args.ca_file, concurrency=args.concurrency)
    configs = [SupervisorConfig(
        url=ws_url, token=tokens[name], state_dir=os.path.join(args.state, name),
        ca_file=args.ca_file, reconnect_initial=args.reconnect_initial,
        reconnect_max=args.reconnect_max, heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout, console_buffer=args.console_buffer,
        durable=not args.no_fsync, name=name, driver_values=mock) for name in names]
    ramp = args.ramp if args.ramp is not None else args.count / 200
    fleet = Fleet(reactor, configs, ramp=ramp)
    fleet.startService()
    return fleet


async def _main(reactor: Any, args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    fleet = await start_fleet(reactor, args, p)
    reactor.addSystemEventTrigger("before", "shutdown", fleet.stopService)
    # Thousands of supervisors' objects: full collections took seconds each.
    FreezePolicy(reactor).startService()
    print(f"fleet: {args.count} supervisors ({args.prefix}{args.first:04d}…), "
          f"state in {args.state}; Ctrl-C stops", flush=True)
    if args.report_interval > 0:
        def report() -> None:
            print("fleet: " + " ".join(f"{k}={v}" for k, v in fleet.summary().items()),
                  flush=True)

        LoopingCall(report).start(args.report_interval, now=False)
    await Deferred()  # until SIGINT/SIGTERM stops the reactor


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    level = LogLevel.info if args.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo([build_text(sys.stderr, level)],
                                     redirectStandardIO=False)
    react(lambda reactor: Deferred.fromCoroutine(_main(reactor, args, p)))


if __name__ == "__main__":
    main()
