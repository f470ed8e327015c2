"""The tunnel WebSocket's own close codes pass Autobahn's check (1000 or 3000-4999)."""

from __future__ import annotations

from typing import Any

from treadmill.common.splice import UNSUPPORTED_DATA
from treadmill.proxy.legs import NO_TUNNEL, TunnelSocket


class Recorded(TunnelSocket):
    """An open :class:`TunnelSocket` whose close frames are recorded, not written."""

    def __init__(self) -> None:
        super().__init__()
        self.state = self.STATE_OPEN
        self.frames: list[tuple[int | None, bytes | None]] = []

    def sendCloseFrame(self, code: Any = None, reasonUtf8: Any = None,
                       isReply: bool = False) -> None:
        self.frames.append((code, reasonUtf8))
        self.state = self.STATE_CLOSING


def test_a_socket_bound_to_no_tunnel_closes_with_4011() -> None:
    socket = Recorded()
    socket.onOpen()
    assert socket.frames == [(NO_TUNNEL, b"no tunnel")] and NO_TUNNEL == 4011


def test_a_text_message_and_bytes_after_eof_close_with_4003() -> None:
    socket = Recorded()
    socket.access = "manage"
    socket.end_message(b"hello", False)
    assert socket.frames == [(UNSUPPORTED_DATA, b"binary messages only")]

    socket = Recorded()
    socket.half_close, socket._eof_received = True, True
    socket.end_message(b"bytes", True)
    assert socket.frames == [(UNSUPPORTED_DATA, b"data after eof")] and UNSUPPORTED_DATA == 4003
