"""The supervisor reports its driver's image kinds in ``status.kinds`` (protocol minor 5),
and only to a switchboard that speaks minor 5: a real WebSocket peer on loopback."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.supervisor.peer import FakeSwitchboard
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.drivers import IHostDriver
from treadmill.supervisor.drivers.mock import MockDriver
from treadmill.supervisor.service import SupervisorService


@pytest.mark.parametrize("switchboard_minor", [protocol.KINDS_MINOR - 1, 99])
@pytest_twisted.ensureDeferred
async def test_status_carries_the_drivers_kinds_from_minor_5(
        peer: FakeSwitchboard, supervisors: Callable[..., SupervisorService],
        switchboard_minor: int) -> None:
    peer.minor = switchboard_minor
    driver = MockDriver(reactor)
    driver.kinds = ("qemu", "board")
    supervisors(driver=driver)
    conn = await peer.connection()
    status = await conn.status()
    negotiated = min(protocol.MINOR, switchboard_minor)
    if negotiated >= protocol.KINDS_MINOR:
        assert status["kinds"] == ["board", "qemu"]
    else:
        assert "kinds" not in status  # an older switchboard would refuse the field
    protocol.validate(status)


@pytest_twisted.ensureDeferred
async def test_a_driver_of_any_kind_sends_no_kinds(
        peer: FakeSwitchboard, supervisors: Callable[..., SupervisorService]) -> None:
    peer.minor = 99
    supervisors(driver=MockDriver(reactor))
    conn = await peer.connection()
    assert "kinds" not in await conn.status()


def test_drivers_declare_their_kinds() -> None:
    from treadmill.supervisor.drivers.qemu.driver import QemuDriver
    from treadmill.supervisor.drivers.serial import SerialDriver

    assert QemuDriver.kinds == ("qemu",) and SerialDriver.kinds == ("board",)
    assert MockDriver.kinds is None
    assert "kinds" in IHostDriver.names()
    protocol.validate(protocol.status(1, None, ["qemu"]))
    with pytest.raises(protocol.ProtocolError):
        protocol.validate(protocol.status(1, None, ["QEMU!"]))
