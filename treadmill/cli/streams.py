"""``tml``'s standard output when it cannot be written: its reader went away
(``tml job ls | head -1``), the disk is full, or the descriptor is closed (``>&-``).

:class:`GuardedOutput` turns the first failed write into a record (:attr:`error`) and
a call of ``on_error``, which stops the command; later writes are dropped. No write
raises, so no retry loop mistakes a local pipe for a server that failed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

EXIT_PIPE = 141
"""The exit status when the reader of standard output went away (128 + SIGPIPE)."""


class GuardedOutput:
    """A text stream (and its ``buffer``) whose failures stop ``tml`` instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.error: OSError | None = None
        self.on_error: Callable[[OSError], None] = lambda error: None
        raw = getattr(stream, "buffer", None)
        self.buffer: _GuardedBuffer | None = None if raw is None else _GuardedBuffer(raw, self)

    def write(self, text: str) -> int:
        """Write ``text``; after a failure, drop it."""
        self._call(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._call(self._stream.flush)

    def _call(self, method: Callable[..., Any], *args: Any) -> None:
        if self.error is not None:
            return
        try:
            method(*args)
        except OSError as e:
            self.error = e
            self.on_error(e)

    @property
    def pipe_closed(self) -> bool:
        """Whether writing failed because the reader went away."""
        return self.error is not None and self.error.errno == errno.EPIPE

    def exit_status(self, report: Callable[[str], None]) -> int:
        """The exit status of a command whose output failed: 141 (quietly) when the reader
        went away, like a program killed by SIGPIPE, else 1 with ``report``'s message."""
        if self.pipe_closed:
            return EXIT_PIPE
        assert self.error is not None
        report(f"cannot write to standard output: {self.error.strerror or self.error}")
        return 1

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno…
        return getattr(self._stream, name)


class _GuardedBuffer:
    """The binary layer of a :class:`GuardedOutput` (console bytes go there as they are)."""

    def __init__(self, raw: BinaryIO, guard: GuardedOutput) -> None:
        self._raw = raw
        self._guard = guard

    def write(self, data: bytes) -> int:
        self._guard._call(self._raw.write, data)
        return len(data)

    def flush(self) -> None:
        self._guard._call(self._raw.flush)


class ClosedOutput:
    """Standard output when its descriptor was closed (``tml … >&-``): every write fails
    as writing to a closed descriptor does."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def reserve_standard_descriptors() -> set[int]:
    """Open ``/dev/null`` on each of descriptors 0, 1 and 2 that is closed, so that no
    socket or pipe ``tml`` opens later becomes its standard input or output; return the
    ones that were closed. Call it before anything opens a file (the reactor does)."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    for fd in sorted(closed):
        opened = os.open(os.devnull, os.O_RDWR)
        if opened != fd:  # a lower one was free after all: leave it as it was
            os.dup2(opened, fd)
            os.close(opened)
    return closed
