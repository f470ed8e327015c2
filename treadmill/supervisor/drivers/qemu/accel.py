"""Choosing the accelerator: ``kvm``, ``tcg``, or ``auto`` with a boot probe.

Some hosts expose a ``/dev/kvm`` that opens, and even runs a few instructions
of a guest, yet hangs a Linux guest. ``auto`` therefore boots a Linux kernel
under KVM with no root file system (``panic=-1`` and ``-no-reboot``: the
kernel panics and QEMU exits, in well under a second with working KVM) and
uses KVM only if that boot finished, with the kernel's banner on the serial
console, within ``qemu.probe_timeout`` seconds. Otherwise TCG, and the log
says why. The result is cached for the life of the process.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.common.deferreds import fork
from treadmill.supervisor.drivers.qemu.settings import QemuSettings

__all__ = ["AccelChooser", "probe_kvm"]

PROBE_CMDLINE = "console=ttyS0 panic=-1 loglevel=7"
HOST_KERNEL = "/boot/vmlinuz"
KVM_DEVICE = "/dev/kvm"
MAX_OUTPUT = 256 * 1024

log = Logger(namespace="treadmill.supervisor.drivers.qemu.accel")

Probe = Callable[[Any, QemuSettings, str | None], Awaitable[tuple[bool, str]]]


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if len(self.output) < MAX_OUTPUT:
            self.output += data

    def processEnded(self, reason: Failure) -> None:
        code = None
        if reason.check(ProcessDone, ProcessTerminated):
            code = reason.value.exitCode
        self.ended.callback(code)


async def probe_kvm(reactor: Any, settings: QemuSettings, kernel: str | None
                    ) -> tuple[bool, str]:
    """Whether KVM boots a Linux guest here, and why (for the log)."""
    if not os.path.exists(KVM_DEVICE):
        return False, f"{KVM_DEVICE} does not exist"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return False, f"{KVM_DEVICE} is not readable and writable by this process"
    if kernel is None:
        return False, ("no Linux kernel to probe KVM with (set qemu.probe_kernel, or use "
                       "qemu.accel = kvm)")
    args = [settings.binary, "-accel", "kvm", "-machine", settings.machine, "-cpu",
            settings.cpu, "-m", "128", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-serial", "stdio", "-kernel", kernel, "-append", PROBE_CMDLINE]
    collect = _Collect()
    try:
        process = reactor.spawnProcess(collect, settings.binary, args, env=dict(os.environ))
    except OSError as e:
        return False, f"cannot run {settings.binary}: {e}"
    timer = reactor.callLater(settings.probe_timeout, _kill, process)
    code = await collect.ended
    hung = not timer.active()
    if not hung:
        timer.cancel()
    if hung:
        return False, (f"a Linux guest did not boot under KVM within "
                       f"{settings.probe_timeout:g} s (it hangs)")
    if b"Linux version" in collect.output and b"Kernel panic" in collect.output:
        return True, "a Linux guest boots under KVM"
    tail = collect.output[-400:].decode("utf-8", "replace").strip()
    return False, f"the KVM probe ended ({code}) without booting the kernel: {tail}"


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except Exception:  # already gone
        pass


class AccelChooser:
    """Resolves ``qemu.accel``; ``auto`` probes once per process (and per binary)."""

    _cache: dict[tuple[str, str, str], Deferred[tuple[bool, str]]] = {}

    def __init__(self, reactor: Any, settings: QemuSettings, probe: Probe = probe_kvm):
        self.reactor = reactor
        self.settings = settings
        self.probe = probe

    def probe_kernel(self, job_kernel: str | None) -> str | None:
        """The kernel the probe boots: ``qemu.probe_kernel``, the job's, or the host's."""
        if self.settings.probe_kernel:
            return self.settings.probe_kernel
        if job_kernel:
            return job_kernel
        if os.access(HOST_KERNEL, os.R_OK):
            return HOST_KERNEL
        return None

    async def choose(self, job_kernel: str | None = None) -> str:
        """``kvm`` or ``tcg``."""
        if self.settings.accel != "auto":
            return self.settings.accel
        key = (self.settings.binary, self.settings.machine, self.settings.cpu)
        cached = self._cache.get(key)
        if cached is None:
            kernel = self.probe_kernel(job_kernel)
            log.info("qemu: accel = auto: probing KVM by booting {kernel}", kernel=kernel)
            cached = Deferred.fromCoroutine(self._probe(kernel))
            self._cache[key] = cached
        works, _why = await fork(cached)
        return "kvm" if works else "tcg"

    async def _probe(self, kernel: str | None) -> tuple[bool, str]:
        try:
            works, why = await self.probe(self.reactor, self.settings, kernel)
        except Exception as e:  # a bug or an odd host: never fail the job for it
            works, why = False, f"the KVM probe failed: {e!r}"
        if works:
            log.info("qemu: accel = auto: using KVM ({why})", why=why)
        else:
            log.warn("qemu: accel = auto: using TCG, not KVM: {why}", why=why)
        return works, why

    @classmethod
    def forget(cls) -> None:
        """Drop cached probe results (tests)."""
        cls._cache.clear()
