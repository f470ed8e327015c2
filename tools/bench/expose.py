"""Publish local services through proxies from the command line, as a supervisor would
(an :class:`~treadmill.supervisor.exposure.ExposureManager` alone): for manual checks
and ``tools/bench/proxy.py``. It prints the endpoints as JSON on every change::

    .venv/bin/python tools/bench/expose.py --job JOB --proxy ws://127.0.0.1:8090 \\
        --token-file TOKEN --service echo=127.0.0.1:7007 [--echo 7007] \\
        [--self-authenticating]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from treadmill.common.gcpolicy import FreezePolicy  # noqa: E402
from treadmill.supervisor.echo import listen_echo  # noqa: E402
from treadmill.supervisor.exposure import ExposureManager, Service  # noqa: E402

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """``tools/bench/expose.py``: publish local services until stopped."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--job", required=True)
    parser.add_argument("--proxy", action="append", required=True, metavar="URL")
    parser.add_argument("--token-file", required=True,
                        help="a file holding the capability token (one for every proxy)")
    parser.add_argument("--service", action="append", default=[], metavar="NAME=HOST:PORT")
    parser.add_argument("--self-authenticating", action="store_true",
                        help="the services authenticate their users themselves: publish "
                        "public TCP ports (otherwise only token-protected WebSocket paths)")
    parser.add_argument("--echo", type=int, metavar="PORT",
                        help="also run an echo service on 127.0.0.1:PORT")
    parser.add_argument("--ca-file")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    args = parser.parse_args(argv)
    with open(args.token_file) as f:
        token = f.read().strip()
    services: dict[str, Service] = {}
    for item in args.service:
        name, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        services[name] = ((host.strip("[]"), int(port), True) if args.self_authenticating
                          else (host.strip("[]"), int(port)))

    level = LogLevel.warn if args.quiet else LogLevel.info
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(level)])],
        redirectStandardIO=False)

    async def run(reactor: Any) -> None:
        # As the supervisor daemon (``common.daemon.add_operator_services``): the start-up
        # heap frozen, the collector's passes over what survives kept short.
        gc.freeze()
        FreezePolicy(reactor).startService()
        if args.echo:
            listen_echo(reactor, args.echo)
        manager = ExposureManager(reactor, args.job,
                                  [{"url": url, "token": token} for url in args.proxy],
                                  services, ca_file=args.ca_file, reconnect_initial=0.2,
                                  reconnect_max=5.0)

        def show(endpoints: list[dict[str, Any]]) -> None:
            print(json.dumps(endpoints), flush=True)

        manager.on_change(show)
        manager.start()
        stopped: Deferred[None] = Deferred()
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromCoroutine(manager.close(final=True)))
        await stopped

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
