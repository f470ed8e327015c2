"""``stopping``: a started service, daemon or client that a fixture yields and stops
afterwards, whatever the test did (``async with stopping(await start_x(...)) as x``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar


class Stoppable(Protocol):
    def stop(self) -> Any: ...


S = TypeVar("S", bound=Stoppable)


@contextlib.asynccontextmanager
async def stopping(running: S) -> AsyncIterator[S]:
    """Yield ``running``; then ``await running.stop()``."""
    try:
        yield running
    finally:
        await running.stop()
