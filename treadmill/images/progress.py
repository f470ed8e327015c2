"""A one-line text progress bar for blob transfers (``\\r``-redrawn, no dependency)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import TextIO


def human_size(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``12.3 MiB``…"""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(eq=False)
class ProgressBar:
    """``label [#####-----]  12.0 MiB / 40.0 MiB  30%  5.1 MiB/s`` on one line.

    ``update(done, total)`` redraws at most every ``interval`` seconds (and
    always at 100%); ``message(text)`` prints a line above the bar;
    ``finish()`` ends the line. When not ``enabled``, nothing is drawn and
    messages are plain lines.
    """

    stream: TextIO
    label: str
    total: int = 0
    _: KW_ONLY
    enabled: bool = True
    width: int = 24
    interval: float = 0.1
    clock: Callable[[], float] = time.monotonic
    done: int = field(default=0, init=False)
    _start: float = field(init=False)
    _last_draw: float | None = field(default=None, init=False)
    _drawn: int = field(default=0, init=False)  # length of the line on screen

    def __post_init__(self) -> None:
        self._start = self.clock()

    def render(self) -> str:
        total = max(self.total, self.done)
        fraction = self.done / total if total else 1.0
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = max(self.clock() - self._start, 1e-6)
        rate = human_size(self.done / elapsed) + "/s"
        return (f"{self.label} [{bar}] {human_size(self.done)} / {human_size(total)} "
                f"{fraction * 100:3.0f}% {rate}")

    def _draw(self) -> None:
        line = self.render()
        pad = " " * max(0, self._drawn - len(line))
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._drawn = len(line)
        self._last_draw = self.clock()

    def update(self, done: int, total: int | None = None) -> None:
        if total:
            self.total = total
        self.done = done
        if not self.enabled:
            return
        now = self.clock()
        complete = self.total and done >= self.total
        if self._last_draw is None or complete or now - self._last_draw >= self.interval:
            self._draw()

    def message(self, text: str) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.enabled and self._last_draw is not None:
            self._draw()

    def finish(self) -> None:
        if self.enabled and self._last_draw is not None:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = 0
        self._last_draw = None
