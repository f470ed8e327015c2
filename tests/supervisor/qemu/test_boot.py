"""The QEMU driver booting the real test image under TCG, end to end.

Each test boots tools/build-test-image's image (a busybox /init speaking the
agent channel) with real QEMU, and checks that the job ends as it should and
that nothing is left behind: no QEMU process, no socket, nothing in the work
directory; only the overlay, moved to the kept directory for snapshots.
"""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from tests.fakes.reporter import Recorder
from tests.supervisor.qemu.conftest import (
    BuiltImage,
    FakeFetcher,
    needs_qemu,
    qemu_processes,
)
from tests.supervisor.qemu.support import job, settings, start, within
from tests.util.waiting import eventually
from treadmill.supervisor.drivers.qemu import QemuDriver
from treadmill.supervisor.drivers.qemu.command import Paths

pytestmark = needs_qemu

def assert_clean(work_dir: str, job_id: str, fetcher: FakeFetcher, kept: bool = True) -> None:
    """No QEMU, nothing in the work directory; the job's disk (only) is kept, its image's
    blobs pinned while it is."""
    assert qemu_processes(f"treadmill-{job_id}") == []
    assert os.listdir(work_dir) == []  # no overlay, socket or log
    assert fetcher.released == fetcher.fetched
    kept_dir = work_dir + "-kept"
    if kept:
        assert sorted(os.listdir(kept_dir)) == [f"{job_id}.json", f"{job_id}.qcow2"]
        assert fetcher.image is not None
        assert sorted(fetcher.pinned) == sorted({fetcher.image.digest,
                                                 *fetcher.image.fetched().paths})
    else:
        assert not os.path.exists(kept_dir) or os.listdir(kept_dir) == []


class Banner(Protocol):
    def __init__(self) -> None:
        from twisted.internet.defer import Deferred
        self.received = b""
        self.got: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\n" in self.received and not self.got.called:
            self.got.callback(self.received)


async def read_banner(port: int, send: bytes = b"") -> bytes:
    proto = Banner()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    if send:
        proto.transport.write(send)
    try:
        return await within(proto.got, 20)
    finally:
        proto.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_job_boots_and_ends_with_the_agents_exit_status(test_image: BuiltImage,
                                                                 work_dir: str) -> None:
    spec = job(exit_status=7, message="seven")
    driver, reporter, fetcher = await start(test_image, work_dir, spec)
    what, args = await within(reporter.ended)
    assert (what, args) == ("exited", (7, "seven")), reporter.reports
    assert reporter.kinds == ["starting", "fetching_image", "allocating", "provisioning", "booting",
                              "ready", "terminating", "exited"]
    console = reporter.console_bytes
    # The chain is the manifest's, by digest: both layers are seen, the job's marker is not.
    assert b"disk: treadmill-base-layer | treadmill-top-layer | \r\n" in console
    assert b'"exit_status":"7"' in console  # the agent got its parameters
    assert set(reporter.offered[0]) == {"ssh", "console"}
    assert "http" in reporter.offered[-1]
    assert_clean(work_dir, spec["id"], fetcher)
    assert driver.run is None


@pytest_twisted.ensureDeferred
async def test_forwards_reach_the_guest_and_stop_tears_everything_down(
        test_image: BuiltImage, work_dir: str) -> None:
    # A reservation (the switchboard's parameter): the image stays up as with hang=1.
    spec = job(**{"treadmill.reservation": "true"})
    driver, reporter, fetcher = await start(test_image, work_dir, spec)
    await within(reporter.became_ready)
    await within(reporter.console_has(b"reserved: staying up"))
    await within(reporter.console_has(b"hanging"))
    services = reporter.offered[-1]
    assert (await read_banner(services["ssh"][1])).startswith(b"SSH-2.0-dropbear")
    http = await read_banner(services["http"][1], b"GET / HTTP/1.0\r\n\r\n")
    assert http.startswith(b"HTTP/1.")
    # Console input through the bridge reaches the guest's serial console.
    assert services["console"][0] == "127.0.0.1"
    assert len(qemu_processes(f"treadmill-{spec['id']}")) == 1
    await driver.stop(spec["id"], "user_terminated")
    what, args = await within(reporter.ended)
    assert (what, args[0]) == ("stopped", "user_terminated")
    assert_clean(work_dir, spec["id"], fetcher)


@pytest_twisted.ensureDeferred
async def test_qemu_killed_is_host_dropped_job(test_image: BuiltImage, work_dir: str) -> None:
    spec = job(hang=1)
    _driver, reporter, fetcher = await start(test_image, work_dir, spec)
    await within(reporter.became_ready)
    [pid] = qemu_processes(f"treadmill-{spec['id']}")
    os.kill(pid, 9)
    what, args = await within(reporter.ended)
    assert (what, args[0]) == ("failed", "host_dropped_job"), reporter.reports
    assert "QEMU exited" in args[1]
    assert_clean(work_dir, spec["id"], fetcher)


@pytest_twisted.ensureDeferred
async def test_stop_while_booting(test_image: BuiltImage, work_dir: str) -> None:
    spec = job()
    driver, reporter, fetcher = await start(test_image, work_dir, spec)
    while "booting" not in reporter.kinds:
        await deferLater(reactor, 0.02, lambda: None)
    await driver.stop(spec["id"], "user_terminated")
    what, args = await within(reporter.ended)
    assert (what, args[0]) == ("stopped", "user_terminated"), reporter.reports
    assert "ready" not in reporter.kinds
    assert_clean(work_dir, spec["id"], fetcher)


@pytest_twisted.ensureDeferred
async def test_console_input_reaches_the_guest_and_a_hung_guest_times_out(
        test_image: BuiltImage, work_dir: str) -> None:
    spec = job(hang=1)
    driver, reporter, fetcher = await start(test_image, work_dir, spec, shutdown_timeout=1.0)
    await within(reporter.console_has(b"hanging"))
    proto = Banner()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                             reporter.offered[-1]["console"][1]), proto)
    proto.transport.write(b"hello from the bridge\n")
    await within(reporter.console_has(b"input hello from the bridge"), 20)
    await within(proto.got, 10)  # the bridge's client sees the console too
    proto.transport.loseConnection()
    began = reactor.seconds()
    await driver.stop(spec["id"], "execution_timeout")  # the guest ignores the power button
    what, args = await within(reporter.ended)
    assert (what, args[0]) == ("stopped", "execution_timeout")
    assert reactor.seconds() - began >= 1.0  # system_powerdown, then quit
    assert_clean(work_dir, spec["id"], fetcher)


@pytest_twisted.ensureDeferred
async def test_two_jobs_in_sequence_share_no_state(test_image: BuiltImage,
                                                   work_dir: str) -> None:
    first = job(write_marker="job-one-was-here")
    driver, reporter, fetcher = await start(test_image, work_dir, first)
    assert (await within(reporter.ended))[0] == "exited"
    assert b"wrote marker job-one-was-here" in reporter.console_bytes
    second = job()
    reporter2 = Recorder()
    await driver.start(second, reporter2)
    assert (await within(reporter2.ended)) == ("exited", (0, "test image done"))
    assert b"disk: treadmill-base-layer | treadmill-top-layer | \r\n" in reporter2.console_bytes
    assert b"job-one-was-here" not in reporter2.console_bytes
    assert_clean(work_dir, second["id"], fetcher)


@pytest_twisted.ensureDeferred
async def test_qemu_failing_at_start_is_host_start_failure_with_its_message(
        test_image: BuiltImage, work_dir: str) -> None:
    spec = job()
    _, reporter, fetcher = await start(test_image, work_dir, spec,
                                       extra_args=("-device", "no-such-device-{job}"))
    what, args = await within(reporter.ended)
    assert (what, args[0]) == ("failed", "host_start_failure"), reporter.reports
    assert f"no-such-device-{spec['id']}" in args[1]  # QEMU's own message, templated arg
    assert_clean(work_dir, spec["id"], fetcher)


@pytest_twisted.ensureDeferred
async def test_an_image_that_cannot_be_fetched_is_image_error(work_dir: str) -> None:
    from treadmill.supervisor.fetch import ImageFetchError
    fetcher = FakeFetcher(None, ImageFetchError("image_not_found", "no store has it"))
    driver = QemuDriver(reactor, settings(work_dir), fetcher=fetcher)
    reporter = Recorder()
    await driver.start(job(), reporter)
    assert (await within(reporter.ended, 10)) == ("failed", ("image_error", "no store has it"))
    assert os.listdir(work_dir) == []
    assert not os.path.exists(work_dir + "-kept")  # no overlay was made: nothing to keep


@pytest_twisted.ensureDeferred
async def test_a_held_failed_job_keeps_its_vm_across_a_restart_until_stopped(
        test_image: BuiltImage, work_dir: str) -> None:
    """hold_on_failure: the failing exit is reported, the guest (told by its agent
    parameters) stays up with its SSH server and console; a restarted driver re-adopts
    the held VM (adopt_held); the stop that ends the hold tears it down as any end."""
    spec = {**job(exit_status=3, message="broken"), "hold_on_failure": 60}
    driver, reporter, fetcher = await start(test_image, work_dir, spec)
    assert await within(reporter.ended) == ("exited", (3, "broken"))
    assert "terminating" not in reporter.kinds  # nothing was torn down
    await within(reporter.console_has(b"held: staying up"))
    [pid] = qemu_processes(f"treadmill-{spec['id']}")
    assert driver.current == spec["id"]
    assert (await read_banner(reporter.offered[-1]["ssh"][1])).startswith(b"SSH-2.0-dropbear")

    await driver.shutdown()  # the supervisor stops: the held VM lives on
    assert qemu_processes(f"treadmill-{spec['id']}") == [pid]
    again = QemuDriver(reactor, settings(work_dir), fetcher=fetcher)
    reporter2 = Recorder()
    assert again.adopt_held(spec, reporter2)
    await eventually(lambda: "ssh" in (reporter2.offered or [{}])[-1], timeout=30)
    services = reporter2.offered[-1]
    assert (await read_banner(services["ssh"][1])).startswith(b"SSH-2.0-dropbear")
    proto = Banner()  # the console bridge of the re-adopted VM takes input
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", services["console"][1]),
                          proto)
    proto.transport.write(b"hello held vm\n")
    await within(reporter2.console_has(b"input hello held vm"), 20)
    proto.transport.loseConnection()
    assert reporter2.kinds == [] and again.current == spec["id"]

    await again.stop(spec["id"], "user_terminated")  # the hold's release
    what, args = await within(reporter2.ended)
    assert (what, args[0]) == ("stopped", "user_terminated"), reporter2.reports
    assert again.current is None
    assert_clean(work_dir, spec["id"], fetcher)


@pytest_twisted.ensureDeferred
async def test_a_held_vm_that_cannot_be_re_adopted_is_killed(test_image: BuiltImage,
                                                              work_dir: str) -> None:
    spec = {**job(exit_status=2), "hold_on_failure": 60}
    driver, reporter, fetcher = await start(test_image, work_dir, spec)
    assert (await within(reporter.ended))[0] == "exited"
    assert len(qemu_processes(f"treadmill-{spec['id']}")) == 1
    await driver.shutdown()
    os.unlink(Paths(os.path.join(work_dir, spec["id"])).qmp)  # no way to control it
    again = QemuDriver(reactor, settings(work_dir), fetcher=fetcher)
    assert not again.adopt_held(spec, Recorder())
    await eventually(lambda: qemu_processes(f"treadmill-{spec['id']}") == [], timeout=15)
    await eventually(lambda: os.listdir(work_dir) == [], timeout=15)
    assert again.current is None
    assert sorted(os.listdir(work_dir + "-kept")) == [f"{spec['id']}.json",
                                                      f"{spec['id']}.qcow2"]  # for snapshots
