"""Console notices while a job has no control connection (its grace period), on a Clock:
a bounded backlog, sent to the next control connection if it speaks control minor 1."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from treadmill.protocol import proxy as messages
from treadmill.proxy.tunnels import CONSOLE_BACKLOG, Tunnel, TunnelConfig, TunnelTable

JOB = "job-1"


class Control:
    """A control connection that records what the registry sends it."""

    def __init__(self, minor: int):
        self.job = JOB
        self.minor = minor
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> bool:
        messages.validate(message)
        self.sent.append(message)
        return True

    def close(self, code: int, reason: str) -> None:
        pass


def console_tunnel(registry: TunnelTable, control: Control) -> Tunnel:
    session = registry.attach(control, "host-1", "token")
    tunnel = session.tunnels["console"] = Tunnel(session, "console")
    registry.detach(control, final=False)  # lost: the grace period starts
    return tunnel


def notify(registry: TunnelTable, tunnel: Tunnel, count: int) -> None:
    for n in range(count):
        registry.console_event(tunnel, "opened", f"conn-{n:011d}", "alice", "read",
                               "192.0.2.1", None)


@pytest.mark.parametrize(("minor", "delivered"), [(1, CONSOLE_BACKLOG), (0, 0)])
def test_notices_wait_for_the_next_control_connection(minor: int, delivered: int) -> None:
    clock = Clock()
    registry = TunnelTable(clock, TunnelConfig(ports=None, grace=30.0), verifier=None,
                        public_factory=lambda tunnel: None, data_port=lambda: 8091)
    tunnel = console_tunnel(registry, Control(1))
    clock.advance(5)
    notify(registry, tunnel, CONSOLE_BACKLOG + 10)
    assert registry.counts["console_notice_dropped"] == 10
    back = Control(minor)
    registry.attach(back, "host-1", "token")
    assert back.sent[0]["type"] == "welcome"
    consoles = [m for m in back.sent if m["type"] == "console"]
    assert len(consoles) == delivered
    assert all(m["at"] == 5.0 and m["subject"] == "alice" for m in consoles)
    assert tunnel.session.console_backlog == []
    notify(registry, tunnel, 1)  # connected now: sent at once (or not at all to minor 0)
    assert len([m for m in back.sent if m["type"] == "console"]) == delivered + minor
