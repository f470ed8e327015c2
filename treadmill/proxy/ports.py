"""Public TCP ports: a configured range handed out at random, and static assignments."""

from __future__ import annotations

import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.error import CannotListenError

__all__ = ["PortAllocator", "PortUnavailable", "PortsExhausted", "parse_port_range",
           "parse_static"]

_RANGE = re.compile(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*")
_STATIC_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class PortsExhausted(Exception):
    """Every port of the range is in use."""


class PortUnavailable(Exception):
    """A static port cannot be bound (another tunnel or program holds it)."""


def parse_port_range(value: Any) -> tuple[int, int] | None:
    """``"40000-40999"`` → ``(40000, 40999)``; ``""`` → None (no dynamic ports)."""
    if not isinstance(value, str):
        raise ValueError("expected a port range such as \"40000-40999\"")
    if not value.strip():
        return None
    match = _RANGE.fullmatch(value)
    if match is None:
        raise ValueError(f"expected a port range such as \"40000-40999\", got {value!r}")
    first, last = int(match.group(1)), int(match.group(2))
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"invalid port range {value!r}")
    return first, last


def parse_static(value: Any) -> dict[str, int]:
    """``{"<job id or host>/<service>": port}``; a string ``"a/ssh=22014,b/ssh=22015"`` too."""
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, port = item.partition("=")
            if not sep:
                raise ValueError(f"expected <job-or-host>/<service>=<port>, got {item.strip()!r}")
            pairs[key.strip()] = port.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ValueError("expected a table of \"<job-or-host>/<service>\" = port")
    result: dict[str, int] = {}
    for key, port in value.items():
        if not isinstance(key, str) or not _STATIC_KEY.fullmatch(key):
            raise ValueError(f"invalid key {key!r}: expected \"<job-or-host>/<service>\"")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{key}: expected a port number, got {port!r}")
        result[key] = port
    ports = list(result.values())
    if len(set(ports)) != len(ports):
        raise ValueError("two static entries name the same port")
    return result


class PortAllocator:
    """Hands out ports of ``[first, last]`` chosen uniformly at random among the free
    ones (from the system's CSPRNG), so that a tunnel's port says nothing about
    another's; a port just released is not given out again while others are free
    (the last ``quarantine`` released ones wait). Static ports and ports that
    cannot be bound are skipped. ``static`` maps ``"<job or host>/<service>"`` to a
    port.
    """

    def __init__(self, port_range: tuple[int, int] | None, static: Mapping[str, int],
                 quarantine: int = 64):
        self.range = port_range
        self.static = dict(static)
        self._reserved = set(self.static.values())
        self.in_use: set[int] = set()
        size = port_range[1] - port_range[0] + 1 if port_range else 0
        self._recent: deque[int] = deque(maxlen=max(0, min(quarantine, size // 2)))

    @property
    def size(self) -> int:
        if self.range is None:
            return 0
        return self.range[1] - self.range[0] + 1

    def describe(self) -> str:
        return f"{self.range[0]}-{self.range[1]}" if self.range else "none"

    def static_port(self, job: str, subject: str, service: str) -> int | None:
        """The static port of ``job/service``, else of ``subject/service``."""
        return self.static.get(f"{job}/{service}", self.static.get(f"{subject}/{service}"))

    def bind_static(self, port: int, listen: Callable[[int], Any]) -> Any:
        if port in self.in_use:
            raise PortUnavailable(f"port {port} is in use by another tunnel")
        try:
            listener = listen(port)
        except CannotListenError as e:
            raise PortUnavailable(f"cannot listen on port {port}: {e.socketError}") from None
        self.in_use.add(port)
        return listener

    def allocate(self, listen: Callable[[int], Any]) -> tuple[int, Any]:
        """A free port of the range and ``listen(port)``'s listener."""
        if self.range is None:
            raise PortsExhausted("this proxy has no port range (ports = \"\"), only static ports")
        first, last = self.range
        size = self.size
        tried: set[int] = set()
        # Random probes first (cheap while the range is mostly free), then every
        # remaining port in a random order; recently released ports come last.
        for port in self._candidates(first, size, tried):
            tried.add(port)
            try:
                listener = listen(port)
            except CannotListenError:
                continue  # something else holds it: try another
            self.in_use.add(port)
            return port, listener
        raise PortsExhausted(f"no free port in {first}-{last} ({len(self.in_use)} in use)")

    def _candidates(self, first: int, size: int, tried: set[int]) -> Any:
        recent = set(self._recent)

        def free(port: int) -> bool:
            return not (port in tried or port in self.in_use or port in self._reserved)

        for _ in range(min(32, size)):
            port = first + secrets.randbelow(size)
            if free(port) and port not in recent:
                yield port
        rest = [p for p in range(first, first + size) if free(p) and p not in recent]
        secrets.SystemRandom().shuffle(rest)
        yield from (p for p in rest if free(p))
        yield from (p for p in self._recent if free(p))

    def release(self, port: int) -> None:
        if port in self.in_use:
            self.in_use.discard(port)
            if self.range is not None and self.range[0] <= port <= self.range[1]:
                self._recent.append(port)
