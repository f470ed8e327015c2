"""Running ``qemu-img`` (and other short tools) as child processes, never blocking."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue

__all__ = ["LOG_TAIL", "ToolError", "run_tool"]

LOG_TAIL = 2000  # bytes of a tool's (or QEMU's) output quoted in a failure message


class ToolError(Exception):
    """A tool could not run or exited with a non-zero status; the message says which."""


async def run_tool(reactor: Any, args: list[str], what: str) -> str:
    """Run ``args`` (through a process protocol on ``reactor``); its standard output.

    Raises :class:`ToolError` (``qemu: WHAT: TOOL exited with N: its stderr``).
    """
    try:
        out, err, code = await getProcessOutputAndValue(
            args[0], args[1:], env=dict(os.environ), reactor=reactor)
    except Exception as e:  # a signal
        raise ToolError(f"qemu: {what}: {args[0]} failed: {e!r}") from None
    if code != 0:
        message = (err or out).decode("utf-8", "replace").strip()[-LOG_TAIL:]
        raise ToolError(f"qemu: {what}: {args[0]} exited with {code}: {message}")
    return out.decode("utf-8", "replace")
