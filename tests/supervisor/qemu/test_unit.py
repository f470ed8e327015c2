"""The QEMU driver's pure parts: settings, command lines, the chain, accel choice, agent."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from tests.fakes.reporter import Recorder
from treadmill.common.config import Setting
from treadmill.images import format as fmt
from treadmill.supervisor.drivers import DRIVER_MODULES, driver_module
from treadmill.supervisor.drivers.qemu import SETTINGS, AccelChooser, QemuDriver, QemuSettings
from treadmill.supervisor.drivers.qemu.command import Paths, blockdev_chain, qemu_command
from treadmill.supervisor.drivers.qemu.driver import HOLD_SETTLE, POWERED_OFF, _Run
from treadmill.supervisor.drivers.qemu.settings import expand_args
from treadmill.supervisor.hold import HOLD_PARAMETER

A, B, C, K = ("sha256:" + c * 64 for c in "abcd")


def image(with_kernel: bool = True) -> fmt.TreadmillImage:
    blobs = [fmt.Blob(A, 10), fmt.Blob(B, 10), fmt.Blob(C, 10)]
    manifest = fmt.build_qemu_manifest(
        blobs, kernel=fmt.Blob(K, 5) if with_kernel else None,
        cmdline="console=ttyS0" if with_kernel else None)
    return fmt.parse_image(manifest)


def path_of(what: Any) -> str:
    digest = what.digest if isinstance(what, fmt.Descriptor) else what
    return f"/blobs/{digest[7:9]}"


def test_the_driver_is_registered_with_its_settings() -> None:
    assert DRIVER_MODULES["qemu"] == "treadmill.supervisor.drivers.qemu"
    module = driver_module("qemu")
    assert all(isinstance(s, Setting) and s.key.startswith("qemu.") for s in module.SETTINGS)
    keys = {s.key for s in SETTINGS}
    assert {"qemu.binary", "qemu.img_binary", "qemu.accel", "qemu.memory", "qemu.cpus",
            "qemu.extra_args", "qemu.firmware", "qemu.ssh_port", "qemu.boot_timeout",
            "qemu.shutdown_timeout", "qemu.work_dir"} <= keys


def test_settings_take_defaults_and_check_values() -> None:
    settings = QemuSettings.from_values({"qemu.memory": 1024, "qemu.accel": "tcg"}, "/var/st")
    assert settings.memory == 1024 and settings.accel == "tcg"
    assert settings.work_dir == "/var/st/qemu" and settings.ssh_port == 22
    with pytest.raises(ValueError):
        QemuSettings.from_values({"qemu.accel": "hvf"})
    with pytest.raises(ValueError):
        QemuSettings.from_values({"qemu.extra_args": ["{nope}"]})


def test_extra_args_are_templated() -> None:
    assert expand_args(["-name", "{job}", "{{x}}", "{work_dir}/a:{ssh_port}"],
                       {"job": "j1", "work_dir": "/w", "ssh_port": 4}) == \
        ["-name", "j1", "{x}", "/w/a:4"]
    with pytest.raises(ValueError):
        expand_args(["{"], {})


def test_the_chain_is_wired_by_digest_base_first_read_only() -> None:
    nodes = blockdev_chain(image(), path_of)
    assert [n["node-name"] for n in nodes] == ["layer0", "layer1", "layer2"]
    assert [n["backing"] for n in nodes] == [None, "layer0", "layer1"]
    assert [n["file"]["filename"] for n in nodes] == ["/blobs/aa", "/blobs/bb", "/blobs/cc"]
    assert all(n["read-only"] and n["file"]["read-only"] for n in nodes)


def test_the_command_line() -> None:
    settings = QemuSettings(memory=256, cpus=2, extra_args=("-smbios", "type=1,serial={job}"))
    args = qemu_command(settings, job_id="j1", image=image(), path_of=path_of,
                        paths=Paths("/w/j1"), accel="tcg", ssh_port=40022)
    assert args[0] == "qemu-system-x86_64"
    joined = " ".join(args)
    for part in ("-accel tcg", "-m 256", "-smp 2", "-S", "-no-reboot",
                 "-kernel /blobs/dd", "-append console=ttyS0",
                 "hostfwd=tcp:127.0.0.1:40022-:22", "name=org.treadmill.agent.0",
                 "socket,id=console,path=/w/j1/console.sock,server=on,wait=off",
                 "-smbios type=1,serial=j1"):
        assert part in joined, part
    blockdevs = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-blockdev"]
    assert blockdevs[-1] == {"driver": "qcow2", "node-name": "disk", "backing": "layer2",
                             "file": {"driver": "file", "filename": "/w/j1/overlay.qcow2"}}
    assert args[-2:] == ["-qmp", "unix:/w/j1/qmp.sock,server=on,wait=off"]
    assert "-bios" not in args


def test_disk_boot_uses_the_configured_firmware() -> None:
    args = qemu_command(QemuSettings(firmware="/usr/share/ovmf/OVMF.fd"), job_id="j",
                        image=image(with_kernel=False), path_of=path_of, paths=Paths("/w"),
                        accel="kvm", ssh_port=1)
    assert "-kernel" not in args and args[args.index("-bios") + 1] == "/usr/share/ovmf/OVMF.fd"


@pytest.mark.parametrize(("accel", "works", "expected", "probes"), [
    ("kvm", False, "kvm", 0),
    ("tcg", True, "tcg", 0),
    ("auto", True, "kvm", 1),
    ("auto", False, "tcg", 1),
])
@pytest_twisted.ensureDeferred
async def test_accel_choice(accel: str, works: bool, expected: str, probes: int) -> None:
    AccelChooser.forget()
    calls: list[str | None] = []

    async def probe(reactor: Any, settings: QemuSettings, kernel: str | None
                    ) -> tuple[bool, str]:
        calls.append(kernel)
        return works, "because"

    chooser = AccelChooser(None, QemuSettings(accel=accel, probe_kernel=None), probe)
    assert await chooser.choose("/k") == expected
    assert await chooser.choose("/k") == expected  # cached per process
    assert calls == ["/k"] * probes
    AccelChooser.forget()


class FakeQMP:
    connected_ = True

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def hmp(self, line: str) -> str:
        self.commands.append(line)
        return ""

    def execute(self, command: str, arguments: Any = None) -> Deferred[Any]:
        self.commands.append(command)
        return succeed({})


@pytest_twisted.ensureDeferred
async def test_the_agent_drives_the_job() -> None:
    clock = MemoryReactorClock()
    driver = QemuDriver(clock, QemuSettings(work_dir="/nonexistent"))
    reporter = Recorder(clock)
    spec = {"id": "j1", "image": {}, "parameters": {"x": {"value": "1"},
                                                    "T": {"value": "s", "secret": True}}}
    run = _Run(driver, spec, reporter)
    assert run.job_parameters == {"x": "1", "T": "s"}
    run.qmp = FakeQMP()  # type: ignore[assignment]
    run.ssh_port = 40022
    run.services = {"ssh": ("127.0.0.1", 40022), "console": ("127.0.0.1", 40023)}
    run.agent_service("http", 80)
    run.agent_service("console", 1)  # reserved: ignored
    assert run.qmp.commands[0].startswith("hostfwd_add net0 tcp:127.0.0.1:")  # type: ignore
    assert run.qmp.commands[0].endswith("-:80")  # type: ignore[union-attr]
    assert set(reporter.offered[-1]) == {"ssh", "console", "http"}
    assert len(reporter.offered[-1]["http"]) == 2  # not self-authenticating: token only
    run.agent_service("ssh", 22)  # the image's sshd: it authenticates its users
    assert reporter.offered[-1]["ssh"] == ("127.0.0.1", 40022, True)
    del reporter.offered[-1]
    run.agent_service("http", 80)  # the same again: no new forward, no new report
    assert len(reporter.offered) == 1 and len(run.qmp.commands) == 1  # type: ignore
    run.agent_ready()
    run.agent_ready()
    assert reporter.kinds == ["ready"]


def test_the_guests_host_keys_are_checked_and_reported() -> None:
    from tests.util.ssh import new_ssh_public_key

    clock = MemoryReactorClock()
    driver = QemuDriver(clock, QemuSettings(work_dir="/nonexistent"))
    reporter = Recorder(clock)
    run = _Run(driver, {"id": "j1", "image": {}, "parameters": {},
                        "ssh_keys": ["ssh-ed25519 AAAA alice"]}, reporter)
    assert run.job_ssh_keys == ["ssh-ed25519 AAAA alice"]
    first, second = new_ssh_public_key(), new_ssh_public_key()
    for bad in ("ssh-ed25519 AAAA", "ssh-dss " + first.split()[1], first + " a comment", ""):
        run.agent_ssh_host_key(bad)
    assert reporter.host_keys == []
    run.agent_ssh_host_key(first)
    run.agent_ssh_host_key(first)  # the same again: nothing new
    run.agent_ssh_host_key(second)
    assert reporter.host_keys == [[first], [first, second]]
    keys = [new_ssh_public_key() for _ in range(10)]
    for key in keys:
        run.agent_ssh_host_key(key)
    assert len(reporter.host_keys[-1]) == 8  # bounded


# -- holding a failed job's VM (hold_on_failure, docs/qemu.md) ------------------------------

def held_run(hold: float | None = 60.0) -> tuple[MemoryReactorClock, QemuDriver, _Run, Recorder]:
    """A driver on a clock whose run is a booted guest (QEMU alive, ready reported)."""
    clock = MemoryReactorClock()
    driver = QemuDriver(clock, QemuSettings(work_dir="/nonexistent"))
    reporter = Recorder(clock)
    spec: dict[str, Any] = {"id": "j1", "image": {}, "parameters": {}}
    if hold is not None:
        spec["hold_on_failure"] = hold
    run = _Run(driver, spec, reporter)
    driver.run = run
    run.alive = run.running = run.ready_reported = True
    return clock, driver, run, reporter


def test_the_agent_is_told_whether_its_job_is_held_on_failure() -> None:
    assert held_run()[2].job_parameters == {HOLD_PARAMETER: "60"}
    assert held_run(None)[2].job_parameters == {}
    clock = MemoryReactorClock()
    driver = QemuDriver(clock, QemuSettings(work_dir="/nonexistent"))
    forged = {"id": "j", "image": {}, "parameters": {HOLD_PARAMETER: {"value": "99"}}}
    assert _Run(driver, forged, Recorder(clock)).job_parameters == {}  # not the user's to say


def test_a_held_failing_exit_keeps_the_vm_once_the_guest_stays_up() -> None:
    clock, driver, run, reporter = held_run()
    run.agent_exit(3, "boom")
    assert reporter.kinds == []  # waiting whether the guest powers itself off
    clock.advance(HOLD_SETTLE)
    assert reporter.reports[-1][1:] == ("exited", (3, "boom"))
    assert reporter.kinds == ["exited"]  # no terminating: nothing is torn down
    assert run.held and driver.current == "j1" and run.alive
    run.agent_exit(0, "again")  # the held guest's agent no longer ends anything
    run._qmp_event("SHUTDOWN", {"guest": True})
    assert reporter.kinds == ["exited"] and driver.current == "j1"
    driver.stop("j1", "user_terminated")  # the hold's release tears the VM down
    run.vm_ended(0)
    clock.advance(1)
    assert reporter.kinds == ["exited", "stopped"] and driver.current is None


def test_a_guest_that_powers_off_after_a_failing_exit_leaves_nothing_to_hold() -> None:
    clock, driver, run, reporter = held_run()
    run.agent_exit(3, "boom")
    clock.advance(HOLD_SETTLE / 2)
    run.vm_ended(0)  # QEMU exits: the guest powered itself off
    clock.advance(1)
    assert reporter.kinds == ["terminating", "exited"]
    assert reporter.reports[-1][2] == (3, f"boom ({POWERED_OFF})")
    assert driver.current is None and not run.held
    clock.advance(HOLD_SETTLE)
    assert reporter.kinds == ["terminating", "exited"]  # the settle timer is gone


@pytest.mark.parametrize("hold, status", [(60.0, 0), (None, 3)])
def test_a_success_or_an_unheld_failure_is_torn_down_at_once(hold: float | None,
                                                              status: int) -> None:
    clock, driver, run, reporter = held_run(hold)
    run.agent_exit(status, "done")
    assert reporter.kinds == ["terminating"] and run.ending == ("exited", status, "done")
    run.vm_ended(0)
    clock.advance(1)
    assert reporter.kinds == ["terminating", "exited"] and driver.current is None


def test_a_held_vm_that_dies_ends_its_hold_and_a_timed_out_one_ignores_its_agent() -> None:
    clock, driver, run, reporter = held_run()
    run.boot_timer = clock.callLater(30, run._boot_timed_out)
    driver.hold("other")  # not its job: nothing changes
    assert not run.held
    driver.hold("j1")  # the runner ended it for execution_timeout and holds it
    assert run.held and run.boot_timer is None
    run.agent_exit(3, "late")
    clock.advance(HOLD_SETTLE)
    assert reporter.kinds == []
    run.vm_ended(None)  # QEMU died under the hold: torn down, reported
    clock.advance(1)
    assert reporter.reports[-1][1] == "failed" and reporter.reports[-1][2][0] == "host_dropped_job"
    assert driver.current is None


def test_a_guest_powering_off_with_ready_boot_ends_the_job() -> None:
    clock = MemoryReactorClock()
    driver = QemuDriver(clock, QemuSettings(work_dir="/nonexistent", ready="boot"))
    reporter = Recorder(clock)
    run = _Run(driver, {"id": "j1", "image": {}, "parameters": {}}, reporter)
    driver.run = run
    run.alive = run.running = True
    run._qmp_event("SHUTDOWN", {"guest": True})
    run.vm_ended(0)  # QEMU exits after the guest's power-off: the job ends
    clock.advance(1)
    assert reporter.kinds == ["terminating", "exited"]
    assert reporter.reports[-1][2] == (0, "the guest powered off") and driver.current is None


def test_a_timeout_hold_while_a_failing_exit_settles_drops_the_exit() -> None:
    clock, driver, run, reporter = held_run()
    run.agent_exit(3, "boom")
    driver.hold("j1")  # the job's time ran out meanwhile: the runner ended and holds it
    clock.advance(HOLD_SETTLE * 2)
    assert reporter.kinds == [] and run.held and driver.current == "j1"
    run.vm_ended(0)  # the guest powers off under the hold: the hold is over
    clock.advance(1)
    assert reporter.reports[-1][1:] == ("failed", ("host_dropped_job",
                                                   "qemu: the held VM is gone (0)"))
