"""A recording :class:`IJobReporter` for the host drivers' tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from zope.interface import implementer

from treadmill.supervisor.drivers import IJobReporter


@implementer(IJobReporter)
class Recorder:
    """Records reports as ``(clock seconds, what, args)``; ``ended`` fires with the
    final one, ``became_ready`` at the first ``ready``.

    A subclass changes the shape of :attr:`reports` by overriding :meth:`_add`
    (the properties read the last two items of each report, whatever comes first).
    """

    def __init__(self, clock: Any = reactor) -> None:
        self.clock = clock
        self.reports: list[tuple[Any, ...]] = []
        self.console_bytes = b""
        self.offered: list[dict[str, tuple[str, int]]] = []
        self.results: list[dict[str, Any]] = []
        self.host_keys: list[list[str]] = []
        self._ended: Deferred[tuple[str, tuple[Any, ...]]] = Deferred()
        self._ready: Deferred[None] = Deferred()
        self._console_waiters: list[tuple[bytes, Deferred[None]]] = []

    @property
    def ended(self) -> Deferred[tuple[str, tuple[Any, ...]]]:
        """Fires with the final report, ``(what, args)``."""
        return self._ended

    @property
    def became_ready(self) -> Deferred[None]:
        return self._ready

    def _add(self, what: str, *args: Any) -> None:
        self.reports.append((self.clock.seconds(), what, args))

    def stage(self, name: str) -> None:
        self._add("stage", name)

    def ready(self) -> None:
        self._add("ready")
        if not self._ready.called:
            self._ready.callback(None)

    def terminating(self, reason: str | None = None) -> None:
        self._add("terminating", reason)

    def _end(self, what: str, *args: Any) -> None:
        self._add(what, *args)
        if not self._ended.called:
            self._ended.callback((what, args))

    def exited(self, exit_status: int, message: str = "") -> None:
        self._end("exited", exit_status, message)

    def failed(self, reason: str, message: str = "") -> None:
        self._end("failed", reason, message)

    def stopped(self, reason: str, message: str = "") -> None:
        self._end("stopped", reason, message)

    def console(self, data: bytes) -> None:
        self.console_bytes += data
        for waiter in list(self._console_waiters):
            if waiter[0] in self.console_bytes:
                self._console_waiters.remove(waiter)
                waiter[1].callback(None)

    def services(self, services: dict[str, tuple[str, int]]) -> None:
        self.offered.append(dict(services))

    def result(self, message: dict[str, Any]) -> None:
        self.results.append(dict(message))

    def ssh_host_keys(self, keys: list[str]) -> None:
        self.host_keys.append(list(keys))

    def console_has(self, text: bytes) -> Deferred[None]:
        """Fires once the console output contains ``text``."""
        d: Deferred[None] = Deferred()
        if text in self.console_bytes:
            d.callback(None)
        else:
            self._console_waiters.append((text, d))
        return d

    @property
    def kinds(self) -> list[str]:
        """Each report's kind, a stage by its name."""
        return [what if what != "stage" else args[0] for *_, what, args in self.reports]

    @property
    def stages(self) -> list[str]:
        return [args[0] for *_, what, args in self.reports if what == "stage"]

    @property
    def last(self) -> tuple[str, tuple[Any, ...]]:
        """The last report's ``(what, args)``."""
        *_, what, args = self.reports[-1]
        return what, args

    @property
    def text(self) -> str:
        return self.console_bytes.decode("utf-8", "replace")
