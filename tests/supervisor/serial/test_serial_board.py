"""The serial driver against the fake board on a pseudo-terminal, on the real reactor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.supervisor.serial.support import FakeBoard, FakeFetcher, Recorder, job, until
from tests.util.waiting import sleep
from treadmill.supervisor.drivers import StartRefused
from treadmill.supervisor.drivers.serial import SerialDriver, SerialSettings
from treadmill.supervisor.hold import HOLD_PARAMETER

APP = b"""print hello from the app
agent {"type":"ready"}
print working
exit 3 all done
"""


class Bed:
    def __init__(self, board: FakeBoard, fetcher: FakeFetcher):
        self.board = board
        self.fetcher = fetcher
        self.drivers: list[SerialDriver] = []

    async def driver(self, **overrides: Any) -> SerialDriver:
        settings = SerialSettings.from_values(self.board.settings(**overrides))
        driver = SerialDriver(reactor, settings, fetcher=self.fetcher)  # type: ignore[arg-type]
        self.drivers.append(driver)
        await until(lambda: driver.present)
        return driver

    async def run(self, driver: SerialDriver, job_id: str, app: bytes, **parameters: Any
                  ) -> tuple[Recorder, tuple[str, tuple[Any, ...]]]:
        reporter = Recorder()
        image = self.fetcher.add({"app.bin": app})
        await driver.start(job(job_id, image, **parameters), reporter)
        end = await reporter.ended
        return reporter, end

    async def hanging(self, driver: SerialDriver, job_id: str, **fields: Any) -> Recorder:
        """Start ``job_id`` with an application that says ready, then hangs; once ready."""
        reporter = Recorder()
        image = self.fetcher.add({"app.bin": b'agent {"type":"ready"}\nhang\n'})
        await driver.start({**job(job_id, image), **fields}, reporter)
        await reporter.became_ready
        return reporter


class BridgeClient(Protocol):
    """A client of a job's console bridge: what it received."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


async def bridge_client(services: dict[str, Any]) -> BridgeClient:
    """Connected to the ``console`` service of ``services`` (a reporter's offer)."""
    host, port = services["console"]
    return await connectProtocol(TCP4ClientEndpoint(reactor, host, port), BridgeClient())


@pytest_twisted.async_yield_fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    board = await FakeBoard(tmp_path / "board").start()
    b = Bed(board, FakeFetcher(tmp_path / "blobs"))
    try:
        yield b
    finally:
        for driver in b.drivers:
            await driver.shutdown()
        board.stop()


@pytest_twisted.ensureDeferred
async def test_happy_path_flashes_boots_and_reports_the_exit_status(bed: Bed) -> None:
    driver = await bed.driver()
    reporter, end = await bed.run(driver, "job-1", APP)
    assert end == ("exited", (3, "all done"))
    assert reporter.stages == ["starting", "fetching_image", "provisioning", "booting"]
    kinds = [what for what, _ in reporter.reports if what != "stage"]
    assert kinds == ["ready", "terminating", "exited"]
    text = reporter.text
    assert "fakeflash: done" in text  # the flash tool's output is on the job's console
    assert "hello from the app" in text and '@@treadmill {"type":"ready"}' in text
    # The console bridge was offered, then withdrawn.
    assert reporter.offered[0]["console"][0] == "127.0.0.1"
    assert reporter.offered[-1] == {}
    events = bed.board.events()
    flashed = events.index(f"flashed app.bin {len(APP)}")
    # Before: the first job's check (erase, then the health reset); then flashed and reset.
    assert events[:flashed] == ["plugged", "boot", "erased", "command reset", "boot"]
    assert events[flashed + 1:flashed + 3] == ["command reset", "boot"]
    # After: erased, and reset once by the health check.
    assert events[-3:] == ["erased", "command reset", "boot"]
    assert not driver.needs_check and bed.fetcher.released == 1
    # The next job runs too, without a second pre-job check.
    reporter, end = await bed.run(driver, "job-2", b'agent {"type":"ready"}\nexit 0\n')
    assert end == ("exited", (0, ""))


@pytest_twisted.ensureDeferred
async def test_flash_failure_is_a_clear_host_start_failure(bed: Bed) -> None:
    driver = await bed.driver()
    reporter, end = await bed.run(driver, "job-1", b"FAIL: this image does not verify\n")
    what, (reason, message) = end
    assert (what, reason) == ("failed", "host_start_failure")
    assert "flash (python" in message and "exited with status 3" in message
    assert "verify failed at 0x00000000" in message
    assert "verify failed" in reporter.text
    assert "booting" not in reporter.stages


@pytest_twisted.ensureDeferred
async def test_agent_parameters_and_console_input_through_the_bridge(bed: Bed) -> None:
    driver = await bed.driver()
    app = b'params\nagent {"type":"ready"}\nread\nexit 0\n'
    reporter = Recorder()
    image = bed.fetcher.add({"app.bin": app})
    await driver.start(job("job-1", image, greeting="hi there",
                           token={"value": "s3cret", "secret": True}), reporter)
    await reporter.became_ready
    assert "param greeting=hi there" in reporter.text and "param token=s3cret" in reporter.text
    client = await bridge_client(reporter.offered[0])
    client.transport.write(b"hello board\r\n")
    what, args = await reporter.ended
    assert (what, args[0]) == ("exited", 0)
    assert "got: hello board" in reporter.text
    assert b"got: hello board" in client.received
    assert "input hello board" in bed.board.events()
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_hung_board_is_reset_by_the_stop(bed: Bed) -> None:
    driver = await bed.driver()
    reporter = await bed.hanging(driver, "job-1")
    await until(lambda: "hung" in bed.board.events())
    resets = bed.board.events().count("command reset")
    await driver.stop("job-1", "execution_timeout")
    end = await reporter.ended
    assert end == ("stopped", ("execution_timeout", "serial: stopped"))
    events = bed.board.events()
    assert events.count("command reset") >= resets + 1
    assert events[events.index("hung"):].count("erased") == 1


@pytest_twisted.ensureDeferred
async def test_device_loss_mid_job_and_return(bed: Bed) -> None:
    driver = await bed.driver()
    reporter = await bed.hanging(driver, "job-1")
    bed.board.ctl("unplug")
    what, (reason, message) = await reporter.ended
    assert (what, reason) == ("failed", "host_dropped_job")
    assert "vanished" in message and bed.board.tty in message
    assert not driver.present
    # A start while the device is absent fails with a clear host-side error.
    absent = Recorder()
    await driver.start(job("job-2", bed.fetcher.add({"app.bin": APP})), absent)
    what, (reason, message) = await absent.ended
    assert (what, reason) == ("failed", "host_start_failure")
    assert "absent" in message
    # It comes back: the driver reopens it, checks the board, and runs the next job.
    bed.board.ctl("plug")
    await until(lambda: driver.present)
    assert driver.needs_check
    reporter, end = await bed.run(driver, "job-3", APP)
    assert end == ("exited", (3, "all done"))


@pytest_twisted.ensureDeferred
async def test_failed_health_check_fails_the_next_start(bed: Bed) -> None:
    driver = await bed.driver(health__timeout=2.0, health__command=[
        *bed.board.settings()["serial.flash.command"][:2], "health", str(bed.board.root)])
    bed.board.ctl("break")  # the board panics on its next boot
    message = await _fails_its_check_then_recovers(bed, driver, "job-1", "job-2")
    assert "FakeBoard ok" in message


@pytest_twisted.ensureDeferred
async def test_health_before_every_job_catches_a_board_that_broke_while_idle(
        bed: Bed) -> None:
    health = [*bed.board.settings()["serial.flash.command"][:2], "health", str(bed.board.root)]
    driver = await bed.driver(health__timeout=2.0, health__command=health,
                              health__before_job=True)
    _, end = await bed.run(driver, "job-1", b'agent {"type":"ready"}\nexit 0\n')
    assert end == ("exited", (0, "")) and not driver.needs_check
    bed.board.ctl("break")  # while idle: nothing notices until the next job
    await _fails_its_check_then_recovers(bed, driver, "job-2", "job-3")


@pytest_twisted.ensureDeferred
async def test_the_agents_results_on_the_console_reach_the_reporter(bed: Bed) -> None:
    driver = await bed.driver()
    app = (b'agent {"type":"test_case","name":"gpio","result":"pass","duration":0.5}\n'
           b'agent {"type":"ready"}\n'
           b'agent {"type":"test_case","name":"uart","result":"fail","message":"no echo"}\n'
           b'agent {"type":"test_case","name":"bad","result":"maybe"}\n'
           b'agent {"type":"summary","result":"fail"}\n'
           b"exit 1 tests failed\n")
    reporter, end = await bed.run(driver, "job-results", app)
    assert end == ("exited", (1, "tests failed"))
    assert reporter.results == [
        {"type": "test_case", "name": "gpio", "result": "pass", "duration": 0.5},
        {"type": "test_case", "name": "uart", "result": "fail", "message": "no echo"},
        {"type": "summary", "result": "fail"}]


HELD_APP = b"""agent {"type":"ready"}
params
exit 3 broken
read
print still here
hang
"""


@pytest_twisted.ensureDeferred
async def test_a_held_failed_job_keeps_the_board_until_stopped(bed: Bed) -> None:
    """hold_on_failure: the failing exit is reported at once and the board stays powered,
    its console captured and typed into through the bridge; the stop (the hold's end)
    then halts, cleans and checks it as after any job, and the next job runs."""
    driver = await bed.driver()
    reporter = Recorder()
    image = bed.fetcher.add({"app.bin": HELD_APP})
    spec = {**job("job-1", image), "hold_on_failure": 60}
    await driver.start(spec, reporter)
    assert await reporter.ended == ("exited", (3, "broken"))
    kinds = [what for what, _ in reporter.reports if what not in ("stage", "services")]
    assert kinds == ["ready", "exited"]  # no terminating: nothing is torn down
    assert f"param {HOLD_PARAMETER}=60" in reporter.text  # the agent was told
    assert driver.current == "job-1"
    after_exit = len(bed.board.events())
    refused = driver.start(job("job-2", image), Recorder())
    try:
        await refused
        raise AssertionError("a held board took another job")
    except StartRefused as e:
        assert "job-1" in e.message

    client = await bridge_client(reporter.offered[-1])  # the bridge is still there
    client.transport.write(b"hello held board\r\n")
    await until(lambda: b"still here" in client.received)
    assert b"got: hello held board" in client.received
    client.transport.loseConnection()
    events = bed.board.events()
    assert "input hello held board" in events
    assert not any(e in ("erased", "command reset", "command off") for e in events[after_exit:])

    await driver.stop("job-1", "user_terminated")
    await until(lambda: driver.current is None)
    assert reporter.reports[-1] == ("stopped", ("user_terminated", "serial: stopped"))
    assert "erased" in bed.board.events()[after_exit:]  # cleaned as after any job
    assert reporter.offered[-1] == {} and not driver.needs_check
    _, end = await bed.run(driver, "job-2", b'agent {"type":"ready"}\nexit 0\n')
    assert end == ("exited", (0, ""))


@pytest_twisted.ensureDeferred
async def test_a_timed_out_held_job_keeps_the_board_as_it_is(bed: Bed) -> None:
    driver = await bed.driver()
    reporter = await bed.hanging(driver, "job-1", hold_on_failure=60)
    await until(lambda: "hung" in bed.board.events())
    driver.hold("job-1")  # the runner ended the job for execution_timeout and holds it
    hung = len(bed.board.events())
    await sleep(0.5)
    assert len(bed.board.events()) == hung and driver.current == "job-1"
    await driver.stop("job-1", "execution_timeout")
    assert await reporter.ended == ("stopped", ("execution_timeout", "serial: stopped"))
    assert "erased" in bed.board.events()[hung:] and driver.current is None


async def _fails_its_check_then_recovers(bed: Bed, driver: SerialDriver, failing: str,
                                         next_job: str
                                         ) -> str:
    """Run ``failing`` on a broken board: it fails its health check (the start fails, the
    driver wants a check); fix the board and ``next_job`` runs. The failure's message."""
    _, end = await bed.run(driver, failing, b'agent {"type":"ready"}\nexit 0\n')
    what, (reason, message) = end
    assert (what, reason) == ("failed", "host_start_failure")
    assert "board health check failed" in message
    assert driver.needs_check
    bed.board.ctl("fix")
    _, end = await bed.run(driver, next_job, b'agent {"type":"ready"}\nexit 0\n')
    assert end == ("exited", (0, ""))
    await sleep(0)
    return message
