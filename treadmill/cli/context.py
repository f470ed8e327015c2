"""What a command handler gets: parsed arguments, streams, settings and an API client."""

from __future__ import annotations

import argparse
import getpass
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from twisted.internet.defer import CancelledError

from treadmill.cli import output
from treadmill.cli.client import ApiClient
from treadmill.cli.config import Settings

# Exit statuses (docs/cli.md).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_JOB_FAILED = 4
EXIT_JOB_ABORTED = 5
EXIT_WAIT_TIMEOUT = 6  # tml job wait --timeout: the job had not ended
EXIT_SIGNAL_BASE = 128  # interrupted by signal N: 128 + N (130 SIGINT, 143 SIGTERM)


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot tell (exit status 2)."""


class CommandError(Exception):
    """A local failure with a message for the user (exit status 1)."""


class Interrupted(BaseException):
    """Raised by the signal handler itself while a prompt or a read of standard input
    blocks the reactor (which cannot take the signal until the read returns)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


T = TypeVar("T")


@dataclass
class Context:
    """Everything a command needs; handlers take it and return an exit status."""

    reactor: Any
    args: argparse.Namespace
    stdout: TextIO
    stderr: TextIO
    stdin: TextIO
    env: Mapping[str, str]
    settings: Settings
    api: ApiClient
    prompt_password: Callable[[str], str] = field(default=lambda prompt: getpass.getpass(prompt))
    interrupted: int | None = None  # the signal that interrupted the command
    reading: bool = False  # a blocking read (:meth:`blocking`) is under way
    take_signal: Callable[[], int | None] = lambda: None  # a signal the reactor has yet to see

    def __post_init__(self) -> None:
        self.api.on_retry = self.note  # "retrying for up to N s", once per request
        self.stdin = _Input(self.stdin, self)  # type: ignore[assignment]

    def blocking(self, read: Callable[..., T], *args: Any) -> T:
        """``read(*args)``, which blocks the reactor until the user types or standard
        input ends (a prompt, ``--password-stdin``); SIGINT or SIGTERM meanwhile
        interrupts the command at once (:class:`Interrupted`)."""
        self.reading = True
        try:
            if (signum := self.take_signal()) is not None:  # came just before the read
                raise Interrupted(signum)
            return read(*args)
        except Interrupted as e:
            self.interrupted = e.signum
            self.stderr.write("\n")  # after the prompt, tml's last words on their own line
            raise CancelledError() from None
        finally:
            self.reading = False

    @property
    def json(self) -> bool:
        """Whether ``--json`` was given."""
        return bool(getattr(self.args, "json", False))

    def write(self, text: str) -> None:
        """Write text to stdout."""
        self.stdout.write(text)
        self.stdout.flush()

    def note(self, text: str) -> None:
        """Write a line for people to stderr."""
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def emit(self, value: Any, render: Callable[[Any], str]) -> int:
        """Print ``value`` as JSON with ``--json``, else as ``render(value)``; return 0."""
        if self.json:
            output.print_json(self.stdout, value)
        else:
            self.write(render(value))
        return EXIT_OK

    async def emit_pages(self, path: str, key: str, params: dict[str, Any],
                         render: Callable[[Any], str], what: str) -> int:
        """:meth:`emit` a listing the API pages by cursor (``{key: [...], "next_cursor":
        ...}``): with ``--all``, every page as one; else the first, and a note when more are
        left (``what``: the items' name)."""
        data = await self.api.get(path, params=params)
        if self.args.all:
            items = list(data.get(key, []))
            seen: set[str] = set()
            while (cursor := data.get("next_cursor")) and cursor not in seen:
                seen.add(cursor)
                data = await self.api.get(path, params={**params, "cursor": cursor})
                items += data.get(key, [])
            data = {key: items}
        status = self.emit(data, render)
        if data.get("next_cursor") and not self.json:
            self.note(f"tml: there are more {what}; use --all to list them all")
        return status

    def read_password_stdin(self) -> str:
        """The password given on stdin (``--password-stdin``), without its final newline."""
        password: str = self.stdin.read()
        password = password.removesuffix("\n").removesuffix("\r")
        if not password:
            raise UsageError("no password on standard input")
        return password


class _Input:
    """Standard input whose reads are :meth:`Context.blocking`."""

    def __init__(self, stream: TextIO, ctx: Context) -> None:
        self._stream = stream
        self._ctx = ctx

    def read(self, size: int = -1) -> str:
        return self._ctx.blocking(self._stream.read, size)

    def readline(self, size: int = -1) -> str:
        return self._ctx.blocking(self._stream.readline, size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


Handler = Callable[[Context], Awaitable[int]]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> int | float:
    """An argparse type: seconds, optionally with a unit (``90``, ``15m``, ``2h``, ``30d``)."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 90, 15m, 2h, 30d)")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    return int(seconds) if seconds == int(seconds) else seconds


def name_value(text: str) -> tuple[str, str]:
    """An argparse type: ``NAME=VALUE``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _int_at_least(text: str, low: int, not_int: str, too_small: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {not_int}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {too_small}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _int_at_least(text, 1, "a positive integer", "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _int_at_least(text, 0, "an integer", "a non-negative integer")


def add_command(
    sub: Any, name: str, handler: Handler, common: argparse.ArgumentParser, *, help: str, **kw: Any
) -> argparse.ArgumentParser:
    """Add a leaf command (with the common options) that runs ``handler``."""
    parser = sub.add_parser(name, help=help, description=help, parents=[common], **kw)
    parser.set_defaults(handler=handler, command_parser=parser)
    return parser


JOB_ID_HELP = "a job id, or a prefix of one that no other job you can see has"


def add_job_id(parser: argparse.ArgumentParser, name: str = "id") -> None:
    """Add a positional job id; ``tml`` resolves a unique prefix to the whole id before
    the handler runs (``job_id_args``)."""
    parser.add_argument(name, metavar="ID", help=JOB_ID_HELP)
    parser.set_defaults(job_id_args=(*(parser.get_default("job_id_args") or ()), name))


def add_tag_option(parser: Any, help: str = "a tag the host must have (repeat)") -> None:
    """Add ``--tag TAG`` (repeatable, into ``tags``): the host tags a job asks for."""
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                        help=help)


def add_param_option(parser: Any, help: str = "a parameter (repeat)") -> None:
    """Add ``--param NAME=VALUE`` (repeatable, into ``params`` as pairs): a job's
    parameters."""
    parser.add_argument("--param", dest="params", action="append", default=[],
                        type=name_value, metavar="NAME=VALUE", help=help)


def add_group(sub: Any, name: str, *, help: str) -> Any:
    """Add a command that only groups subcommands; return its subparsers."""
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(command_parser=parser)
    return parser.add_subparsers(
        title="commands", metavar="COMMAND", dest=f"{parser.prog} command", required=True
    )
