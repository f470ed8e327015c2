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
from typing import Any, TextIO, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from treadmill.cli.client import ApiClient, ApiError, NotUtf8, Unreachable
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
    Interrupted,
    UsageError,
)
from treadmill.cli.jobids import resolve_job_args
from treadmill.cli.output import clean
from treadmill.cli.sse import SSEError
from treadmill.cli.streams import ClosedOutput, GuardedOutput, reserve_standard_descriptors

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
_INTERNAL = "internal error (a bug in tml; the traceback is above)"
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
        "SIGINT/SIGTERM; 141 standard output's reader went away. Job ids may be unique "
        "prefixes. See docs/cli.md.",
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
    stdout: GuardedOutput,
    stderr: TextIO,
    env: Mapping[str, str],
    stdin: TextIO,
    interrupts: Interrupts | None = None,
) -> int:
    args = parse_args(argv, cast(TextIO, stdout), stderr)
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
    ctx = Context(reactor, args, cast(TextIO, stdout), stderr, stdin, env, settings, api)
    if interrupts is not None:
        interrupts.prepare(ctx)  # the command may block in a prompt before it awaits
    task = Deferred.fromCoroutine(_handle(ctx))
    stdout.on_error = lambda _: reactor.callLater(0, _output_failed, ctx, task)
    if interrupts is not None:
        interrupts.bind(ctx, task)
    try:
        return await task
    except CancelledError:
        if ctx.interrupted is None:
            raise
        if stdout.error is None:
            stderr.write(
                f"tml: interrupted ({_SIGNAL_NAMES.get(ctx.interrupted, ctx.interrupted)})\n")
        return EXIT_SIGNAL_BASE + ctx.interrupted
    except UsageError as e:
        stderr.write(args.command_parser.format_usage())
        error(str(e))
        return EXIT_USAGE
    except NotUtf8 as e:
        error(f"an argument: {e}")
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
        error(_INTERNAL)
        return EXIT_ERROR
    finally:
        if interrupts is not None:
            interrupts.unbind()
        await api.close()


def _output_failed(ctx: Context, task: Deferred[int]) -> None:
    """Standard output cannot be written: stop the command as an interrupt does (``job
    run`` cancels its job), a reactor turn after the write that failed."""
    if not task.called and ctx.interrupted is None:
        ctx.interrupted = signal.SIGPIPE
        task.cancel()


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
        self._prepared: Context | None = None
        self._pending: list[int] = []  # signals the reactor has yet to fire
        self._taken: list[int] = []  # signals a blocking read took before the reactor
        self.fired: int | None = None

    def prepare(self, ctx: Context) -> None:
        """The command about to start: its blocking reads may be interrupted from then."""
        self._prepared = ctx
        ctx.take_signal = self._take

    def _take(self) -> int | None:
        if not self._pending:
            return None
        signum = self._pending.pop(0)
        self._taken.append(signum)
        return signum

    def bind(self, ctx: Context, task: Deferred[int]) -> None:
        """The command to interrupt."""
        self._ctx, self._task = ctx, task
        if self.fired is not None:
            self.fire(self.fired)

    def unbind(self) -> None:
        """The command is over."""
        self._ctx = self._task = self._prepared = None

    def signalled(self, signum: int) -> None:
        """In the signal handler itself, before it has the reactor :meth:`fire`: a
        blocking read of the command (:meth:`Context.blocking`) is interrupted at once,
        since the reactor cannot run until it returns; a read about to start takes it."""
        ctx = self._prepared
        if ctx is not None and ctx.reading and ctx.interrupted is None:
            raise Interrupted(signum)
        self._pending.append(signum)

    def fire(self, signum: int) -> None:
        """A signal arrived (on the reactor's thread)."""
        if signum in self._pending:
            self._pending.remove(signum)
        elif signum in self._taken:
            self._taken.remove(signum)  # a blocking read interrupted the command with it
            return
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
    """Run ``tml`` with ``argv`` (without the program name); fire with its exit status.

    If ``stdout`` cannot be written, the command stops: 141 when its reader went away
    (``tml job ls | head -1``), else 1 with a message (``streams``)."""
    out = stdout if isinstance(stdout, GuardedOutput) else GuardedOutput(stdout)
    return Deferred.fromCoroutine(
        _guarded(reactor, argv, out, stderr, env, stdin if stdin is not None else sys.stdin,
                 interrupts)
    )


async def _guarded(reactor: Any, argv: Sequence[str], out: GuardedOutput, stderr: TextIO,
                   env: Mapping[str, str], stdin: TextIO, interrupts: Interrupts | None
                   ) -> int:
    status = await _run(reactor, argv, out, stderr, env, stdin, interrupts)
    out.flush()  # what --json left in the buffer: its failure is the command's
    if out.error is None:
        return status

    def report(message: str) -> None:
        stderr.write(f"tml: error: {message}\n")
        stderr.flush()

    return out.exit_status(report)


def _crashed(failure: Failure) -> int:
    sys.stderr.write(failure.getTraceback())
    sys.stderr.write(f"tml: error: {_INTERNAL}\n")
    return EXIT_ERROR


def main() -> None:
    """The ``tml`` console script: SIGINT and SIGTERM interrupt the command (exit status
    130 and 143; see :class:`Interrupts`)."""
    reserve_standard_descriptors()  # before the reactor opens its first descriptor
    from twisted.internet import reactor

    out = GuardedOutput(sys.stdout if sys.stdout is not None else cast(TextIO, ClosedOutput()))
    if sys.stdin is None:  # closed: reads end at once (getpass reads sys.stdin too)
        sys.stdin = open(os.devnull)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    status = [EXIT_ERROR]

    def finish(code: int) -> None:
        status[0] = code
        if reactor.running:
            reactor.stop()

    interrupts = Interrupts(finish)

    def start() -> None:
        # After the reactor's own handlers (installed at start-up), so these win.
        def on_signal(signum: int, _: Any) -> None:
            interrupts.signalled(signum)
            reactor.callFromThread(interrupts.fire, signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
        done = run(reactor, sys.argv[1:], cast(TextIO, out), sys.stderr, dict(os.environ),
                   interrupts=interrupts)
        done.addErrback(_crashed)  # a failure outside the command's own handling
        done.addBoth(lambda code: finish(code if isinstance(code, int) else EXIT_ERROR))

    reactor.callWhenRunning(start)
    reactor.run()
    out.flush()
    if out.error is not None and sys.stdout is not None:
        # What is left in its buffer goes nowhere, instead of failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(status[0])


if __name__ == "__main__":
    main()
