"""The serial driver's helpers: argument templates and external commands.

Commands (flash, erase, power, reset, clean, health) are argv lists, never
shell strings, run with ``reactor.spawnProcess`` under a timeout; their
output goes to a callback (the job's console) and the last bytes are kept for
error messages.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = ["CommandResult", "TemplateError", "check_template", "expand", "parameters_used",
           "run_command"]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
TAIL = 2048  # bytes of a command's output kept for its error message
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when a command times out


class TemplateError(ValueError):
    """An argument template cannot be filled in; ``kind`` says whose fault it is:
    ``config`` (the operator's), ``image`` or ``parameter`` (the job's)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _tokens(arg: str) -> list[str]:
    found = []
    for m in _PLACEHOLDER.finditer(arg):
        if m.group(0) in ("{{", "}}"):
            continue
        if m.group(1) is None:
            raise TemplateError("config", f"unbalanced brace in argument {arg[:80]!r}")
        found.append(m.group(1))
    return found


def check_template(argv: Sequence[str]) -> None:
    """Refuse unknown placeholders in an operator's command (``ValueError``)."""
    for arg in argv:
        for token in _tokens(arg):
            kind, sep, name = token.partition(":")
            if token in ("port", "job", "firmware"):
                continue
            if sep and kind in ("firmware", "target", "param") and name:
                continue
            raise TemplateError("config", f"unknown placeholder {{{token[:80]}}} in {arg[:80]!r}"
                                " (expected {port}, {job}, {firmware}, {firmware:NAME}, "
                                "{target:NAME} or {param:NAME})")


def parameters_used(argv: Sequence[str]) -> set[str]:
    """The job parameters a command's ``{param:NAME}`` placeholders name."""
    return {token.partition(":")[2] for arg in argv for token in _tokens(arg)
            if token.startswith("param:")}


def expand(argv: Sequence[str], *, port: str, job: str = "",
           firmware: Mapping[str, str] | None = None,
           targets: Mapping[str, str | None] | None = None,
           params: Mapping[str, str] | None = None) -> list[str]:
    """Fill in an operator's command: ``{port}``, ``{job}``, ``{firmware}`` (the
    image's only firmware file), ``{firmware:NAME}``, ``{target:NAME}``,
    ``{param:NAME}``; ``{{`` and ``}}`` are literal braces."""
    firmware = firmware or {}
    targets = targets or {}
    params = params or {}

    def sub(m: re.Match[str]) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        placeholder = m.group(1)
        if placeholder is None:
            raise TemplateError("config", "unbalanced brace")
        if placeholder == "port":
            return port
        if placeholder == "job":
            return job
        if placeholder == "firmware":
            if len(firmware) != 1:
                raise TemplateError("image", "the host's command takes the image's only "
                                    f"firmware file ({{firmware}}), and it has {len(firmware)}")
            return next(iter(firmware.values()))
        kind, _, name = placeholder.partition(":")
        if kind == "firmware":
            if name not in firmware:
                raise TemplateError("image", f"the host's command needs firmware {name!r}, "
                                    "which the image does not have")
            return firmware[name]
        if kind == "target":
            if not targets.get(name):
                raise TemplateError("image", f"the host's command needs the target of "
                                    f"firmware {name!r}, which the image does not give")
            return str(targets[name])
        if kind == "param":
            if name not in params:
                raise TemplateError("parameter", f"the host's command needs job parameter "
                                    f"{name!r}")
            return params[name]
        raise TemplateError("config", f"unknown placeholder {{{placeholder[:80]}}}")

    return [_PLACEHOLDER.sub(sub, arg) for arg in argv]


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: ``status`` (None if killed by a signal or not run)."""

    argv: tuple[str, ...]
    status: int | None
    signal: int | None = None
    timed_out: bool = False
    tail: bytes = b""
    error: str | None = None  # it could not be started

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.timed_out and self.error is None

    def describe(self, what: str, timeout: float | None = None) -> str:
        """A clear one-paragraph message: what ran, how it ended, its last output."""
        name = os.path.basename(self.argv[0]) if self.argv else "?"
        if self.error is not None:
            how = f"could not be started: {self.error}"
        elif self.timed_out:
            how = f"timed out after {timeout:g} s and was killed" if timeout else "timed out"
        elif self.signal is not None:
            how = f"was killed by signal {self.signal}"
        else:
            how = f"exited with status {self.status}"
        text = f"{what} ({name}) {how}"
        tail = self.tail.decode("utf-8", "replace").strip()
        if tail:
            last = "\n".join(tail.splitlines()[-10:])
            text += ": " + (last if len(last) <= 800 else "…" + last[-800:])
        return text


class _Command(ProcessProtocol):
    def __init__(self, argv: Sequence[str], output: Callable[[bytes], None], done: Deferred[Any]):
        self.argv = tuple(argv)
        self.output = output
        self.done = done
        self.tail = bytearray()
        self.timed_out = False
        self.timer: Any = None
        self.kill_timer: Any = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def _data(self, data: bytes) -> None:
        self.tail += data
        del self.tail[:-TAIL]
        self.output(data)

    outReceived = _data
    errReceived = _data

    def kill(self, signal: str) -> None:
        try:
            self.transport.signalProcess(signal)
        except (ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Failure) -> None:
        for timer in (self.timer, self.kill_timer):
            if timer is not None and timer.active():
                timer.cancel()
        status: int | None = 0
        signal = None
        if reason.check(ProcessTerminated):
            status, signal = reason.value.exitCode, reason.value.signal
        elif not reason.check(ProcessDone):
            status = None
        if not self.done.called:
            self.done.callback(CommandResult(self.argv, status, signal, self.timed_out,
                                             bytes(self.tail)))


def run_command(reactor: Any, argv: Sequence[str], timeout: float,
                output: Callable[[bytes], None] = lambda data: None,
                env: Mapping[str, str] | None = None) -> Deferred[CommandResult]:
    """Run ``argv`` (no shell) for at most ``timeout`` seconds; fires with a
    :class:`CommandResult`, never fails. Cancelling it kills the command."""
    argv = list(argv)
    executable = shutil.which(argv[0]) if argv else None
    if executable is None:
        problem = "no command configured" if not argv else f"{argv[0]}: command not found"
        return succeed(CommandResult(tuple(argv), None, error=problem))
    proto: _Command

    def cancel(_: Deferred[Any]) -> None:
        proto.kill("KILL")

    done: Deferred[CommandResult] = Deferred(cancel)
    proto = _Command(argv, output, done)
    try:
        reactor.spawnProcess(proto, executable, argv, env=dict(env if env is not None
                                                               else os.environ))
    except OSError as e:
        done.callback(CommandResult(tuple(argv), None, error=e.strerror or str(e)))
        return done

    def expire() -> None:
        proto.timed_out = True
        proto.kill("TERM")
        proto.kill_timer = reactor.callLater(KILL_GRACE, proto.kill, "KILL")

    proto.timer = reactor.callLater(timeout, expire)
    return done
