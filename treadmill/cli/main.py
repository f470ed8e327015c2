"""``tml``: the Treadmill command-line client.

:func:`run` is the whole program with its inputs and outputs as arguments, so
that tests run it in-process; :func:`main` is the console script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from twisted.internet.defer import CancelledError, Deferred

from treadmill.cli.client import ApiClient, ApiError, Unreachable
from treadmill.cli.commands import admin, audit, grants, hosts, identity, images, jobs
from treadmill.cli.commands import keys as ssh_keys
from treadmill.cli.config import ConfigError, resolve
from treadmill.cli.context import (
    EXIT_ERROR,
    EXIT_SIGNAL_BASE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CommandError,
    Context,
    UsageError,
)
from treadmill.cli.jobids import resolve_job_args
from treadmill.cli.output import clean
from treadmill.cli.sse import SSEError

_GLOBAL_OPTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "--url",
        "URL",
        "switchboard URL (default: $TREADMILL_URL, the config file, http://127.0.0.1:8080)",
    ),
    (
        "--token",
        "TOKEN",
        "API token; visible to other local users in the process list: prefer "
        "--token-file or $TREADMILL_TOKEN",
    ),
    (
        "--token-file",
        "PATH",
        "read the API token from this file (default: $TREADMILL_TOKEN, the config file)",
    ),
    (
        "--ca-file",
        "PEM",
        "CA certificates to verify the switchboard with "
        "(default: $TREADMILL_CA_FILE, the config file, the system's)",
    ),
    (
        "--config",
        "PATH",
        "config file (default: $TREADMILL_CONFIG, "
        "$XDG_CONFIG_HOME/treadmill/tml.toml, ~/.config/treadmill/tml.toml)",
    ),
)
_JSON_HELP = "print the API's JSON instead of text"
_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _add_globals(parser: argparse.ArgumentParser, default: Any) -> None:
    group = parser.add_argument_group("connection options")
    for flag, metavar, help in _GLOBAL_OPTIONS:
        group.add_argument(flag, metavar=metavar, default=default, help=help)
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if default is None else default,
        help=_JSON_HELP,
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; the global options are accepted after any command too."""
    parser = argparse.ArgumentParser(
        prog="tml",
        description="Treadmill command-line client: jobs, hosts, images, tokens.",
        epilog="Exit status: 0 success, 1 error, 2 usage error, 3 switchboard unreachable; "
        "'job run', 'job wait', 'job submit --follow': 4 workload failed, 5 job ended "
        "otherwise; 'job wait --timeout': 6 not ended; 130/143 interrupted by "
        "SIGINT/SIGTERM. Job ids may be unique prefixes. See docs/cli.md.",
    )
    _add_globals(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _add_globals(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    for module in (identity, admin, hosts, grants, images, jobs, ssh_keys, audit):
        module.register(sub, common)
    return parser


def parse_args(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> argparse.Namespace | int:
    """Parse ``argv``; return the namespace, or an exit status after help or an error."""
    parser = build_parser()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            return parser.parse_args(list(argv))
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else EXIT_USAGE


async def _run(
    reactor: Any,
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    env: Mapping[str, str],
    stdin: TextIO,
    interrupts: Interrupts | None = None,
) -> int:
    args = parse_args(argv, stdout, stderr)
    if isinstance(args, int):
        return args

    def error(message: str) -> None:
        stderr.write(f"tml: error: {message}\n")
        stderr.flush()

    try:
        settings = resolve(
            env,
            url=args.url,
            token=args.token,
            ca_file=args.ca_file,
            config=args.config,
            token_file=args.token_file,
        )
        if args.token:
            stderr.write(
                "tml: warning: --token puts the token on the command line, where other "
                "local users can read it; use --token-file, TREADMILL_TOKEN or tml login\n"
            )
        api = ApiClient.from_settings(reactor, settings)
    except ConfigError as e:
        error(str(e))
        return EXIT_ERROR
    ctx = Context(reactor, args, stdout, stderr, stdin, env, settings, api)
    task = Deferred.fromCoroutine(_handle(ctx))
    if interrupts is not None:
        interrupts.bind(ctx, task)
    try:
        return await task
    except CancelledError:
        if ctx.interrupted is None:
            raise
        stderr.write(f"tml: interrupted ({_SIGNAL_NAMES.get(ctx.interrupted, ctx.interrupted)})\n")
        return EXIT_SIGNAL_BASE + ctx.interrupted
    except UsageError as e:
        stderr.write(args.command_parser.format_usage())
        error(str(e))
        return EXIT_USAGE
    except ApiError as e:
        message = e.message
        if e.status == 401 and not settings.token and args.handler is not identity.login:
            message += " (not logged in: run 'tml login' or set TREADMILL_TOKEN)"
        error(clean(message))
        return EXIT_ERROR
    except Unreachable as e:
        error(str(e))
        return EXIT_UNREACHABLE
    except (CommandError, ConfigError) as e:
        error(str(e))
        return EXIT_ERROR
    except SSEError as e:
        error(f"bad event stream from the switchboard: {e}")
        return EXIT_ERROR
    except Exception:
        stderr.write(traceback.format_exc())
        error("internal error (a bug in tml; the traceback is above)")
        return EXIT_ERROR
    finally:
        if interrupts is not None:
            interrupts.unbind()
        await api.close()


async def _handle(ctx: Context) -> int:
    await resolve_job_args(ctx)
    return await ctx.args.handler(ctx)


class Interrupts:
    """Signals for a running ``tml`` (:func:`main` wires SIGINT and SIGTERM to :meth:`fire`).

    The first signal cancels the command, which cleans up (``job run`` cancels its
    job) and exits with 128 + the signal's number; a second one ends the program
    at once through ``force``.
    """

    def __init__(self, force: Callable[[int], None]) -> None:
        self.force = force
        self._ctx: Context | None = None
        self._task: Deferred[int] | None = None
        self.fired: int | None = None

    def bind(self, ctx: Context, task: Deferred[int]) -> None:
        """The command to interrupt."""
        self._ctx, self._task = ctx, task
        if self.fired is not None:
            self.fire(self.fired)

    def unbind(self) -> None:
        """The command is over."""
        self._ctx = self._task = None

    def fire(self, signum: int) -> None:
        """A signal arrived (on the reactor's thread)."""
        if self._ctx is not None and self._ctx.interrupted is not None:
            self.force(EXIT_SIGNAL_BASE + signum)  # the second one: no more cleaning up
            return
        self.fired = signum
        if self._ctx is not None and self._task is not None:
            self._ctx.interrupted = signum
            self._task.cancel()


def run(
    reactor: Any,
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    env: Mapping[str, str],
    *,
    stdin: TextIO | None = None,
    interrupts: Interrupts | None = None,
) -> Deferred[int]:
    """Run ``tml`` with ``argv`` (without the program name); fire with its exit status."""
    return Deferred.fromCoroutine(
        _run(reactor, argv, stdout, stderr, env, stdin if stdin is not None else sys.stdin,
             interrupts)
    )


def main() -> None:
    """The ``tml`` console script: SIGINT and SIGTERM interrupt the command (exit status
    130 and 143; see :class:`Interrupts`)."""
    from twisted.internet import reactor

    status = [EXIT_ERROR]

    def finish(code: int) -> None:
        status[0] = code
        if reactor.running:
            reactor.stop()

    interrupts = Interrupts(finish)

    def start() -> None:
        # After the reactor's own handlers (installed at start-up), so these win.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda n, _: reactor.callFromThread(interrupts.fire, n))
        done = run(reactor, sys.argv[1:], sys.stdout, sys.stderr, dict(os.environ),
                   interrupts=interrupts)
        done.addBoth(lambda code: finish(code if isinstance(code, int) else EXIT_ERROR))

    reactor.callWhenRunning(start)
    reactor.run()
    sys.stdout.flush()
    raise SystemExit(status[0])


if __name__ == "__main__":
    main()
