"""``tml``: the Treadmill command-line client.

:func:`run` is the whole program with its inputs and outputs as arguments, so
that tests run it in-process; :func:`main` is the console script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred

from treadmill.cli.client import ApiClient, ApiError, Unreachable
from treadmill.cli.commands import admin, grants, hosts, identity, images, jobs
from treadmill.cli.config import ConfigError, resolve
from treadmill.cli.context import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CommandError,
    Context,
    UsageError,
)
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
        "'job submit --follow': 4 workload failed, 5 job ended otherwise. See docs/cli.md.",
    )
    _add_globals(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _add_globals(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    for module in (identity, admin, hosts, grants, images, jobs):
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
    try:
        return await args.handler(ctx)
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
        await api.close()


def run(
    reactor: Any,
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    env: Mapping[str, str],
    *,
    stdin: TextIO | None = None,
) -> Deferred[int]:
    """Run ``tml`` with ``argv`` (without the program name); fire with its exit status."""
    return Deferred.fromCoroutine(
        _run(reactor, argv, stdout, stderr, env, stdin if stdin is not None else sys.stdin)
    )


def main() -> None:
    """The ``tml`` console script."""
    from twisted.internet.task import react

    async def _main(reactor: Any) -> None:
        status = await run(reactor, sys.argv[1:], sys.stdout, sys.stderr, dict(os.environ))
        if status:
            raise SystemExit(status)

    react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))


if __name__ == "__main__":
    main()
