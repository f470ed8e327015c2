"""The QEMU driver: one VM per job, from a fresh overlay on the image's read-only chain."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from treadmill.common import sshkeys
from treadmill.protocol.agent import AgentHandler, AgentProtocol
from treadmill.supervisor.console import ConsoleBridge
from treadmill.supervisor.drivers import (
    IHostDriver,
    IHostSnapshots,
    IJobReporter,
    SnapshotError,
)
from treadmill.supervisor.drivers.qemu.accel import AccelChooser
from treadmill.supervisor.drivers.qemu.command import Paths, overlay_command, qemu_command
from treadmill.supervisor.drivers.qemu.process import LOG_TAIL, ToolError, run_tool
from treadmill.supervisor.drivers.qemu.qmp import QMPClient, QMPError
from treadmill.supervisor.drivers.qemu.snapshot import KeptDisks, disk_info
from treadmill.supervisor.drivers.single import SingleJobDriver
from treadmill.supervisor.fetch import FetchedImage, ImageFetcher, ImageFetchError
from treadmill.supervisor.hold import agent_parameters, hold_for

__all__ = ["QemuDriver", "StartFailure"]

CONNECT_RETRY = 0.05
KILL_WAIT = 10.0
RESERVED_SERVICES = ("ssh", "console")
MAX_HOST_KEYS = 8  # as many as job_endpoints.ssh_host_keys carries
HOLD_SETTLE = 2.0
"""Seconds a held job's failing ``exit`` waits for the guest to power itself off (then
there is nothing to hold) before the driver reports the exit and keeps the VM."""
POWERED_OFF = "the guest powered itself off after its exit, so there is nothing to hold"


class StartFailure(Exception):
    """The host could not be prepared or booted (``host_start_failure``)."""


class _Stopped(Exception):
    """The job ended (a stop) while it was starting."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def read_tail(path: str, size: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


class _VmProcess(ProcessProtocol):
    """QEMU as our child: its output goes to a file, we only see it end."""

    def __init__(self, run: _Run):
        self.run = run

    def processEnded(self, reason: Failure) -> None:
        code: Any = None
        if reason.check(ProcessDone, ProcessTerminated):
            value = reason.value
            code = value.exitCode if value.exitCode is not None else f"signal {value.signal}"
        self.run.vm_ended(code)


class _Console(Protocol):
    def __init__(self, run: _Run):
        self.run = run

    def dataReceived(self, data: bytes) -> None:
        self.run.reporter.console(data)
        if self.run.bridge is not None:
            self.run.bridge.output(data)


class _Run(AgentHandler):
    """One job on the QEMU host."""

    log = Logger()

    def __init__(self, driver: QemuDriver, job: dict[str, Any], reporter: IJobReporter):
        self.driver = driver
        self.reactor = driver.reactor
        self.settings = driver.settings
        self.job = job
        self.job_id = str(job["id"])
        parameters = job.get("parameters") or {}
        self.job_parameters = agent_parameters(job, {
            name: (spec or {}).get("value") for name, spec in parameters.items()})
        self.job_ssh_keys = list(job.get("ssh_keys") or [])
        self.host_keys: list[str] = []
        self.reporter = reporter
        self.paths = Paths(os.path.join(self.settings.work_dir, self.job_id))
        self.fetched: FetchedImage | None = None
        self.disk: dict[str, Any] | None = None  # what a snapshot of the disk needs
        self.pinned: list[str] = []
        self.pid: int | None = None
        self.process: Any = None
        self.alive = False
        self.exit_code: Any = None
        self._exit_waiters: list[Deferred[None]] = []
        self._watch: LoopingCall | None = None
        self.qmp: QMPClient | None = None
        self.console: _Console | None = None
        self.agent: AgentProtocol | None = None
        self.bridge: ConsoleBridge | None = None
        self.services: dict[str, tuple[str, int] | tuple[str, int, bool]] = {}
        self.forwards: dict[int, int] = {}  # guest port -> host port
        self.running = False  # the guest runs (after cont)
        self.ready_reported = False
        self.ending: tuple[str, ...] | None = None
        self.main: Deferred[None] | None = None
        self.boot_timer: Any = None
        self.finished: Deferred[None] = Deferred()
        self.graceful = False
        self.with_log = False
        self._finishing = False
        # Holding (hold_on_failure): a failing exit waiting for HOLD_SETTLE, then held.
        self.exit_pending: tuple[int, str] | None = None
        self.settle_timer: Any = None
        self.held = False

    # -- start-up ------------------------------------------------------------------------

    def begin(self) -> None:
        self.main = Deferred.fromCoroutine(self._start_up())
        self.main.addCallbacks(self._start_done, self._start_failed)

    def _start_done(self, _: None) -> None:
        if self.ending is not None and self.ending != ("detached",):
            self._finish_later()

    def _check(self) -> None:
        if self.ending is not None:
            raise _Stopped()

    async def _start_up(self) -> None:
        self.reporter.stage("starting")  # started_at: the job is accepted and under way
        self.reporter.stage("fetching_image")
        fetcher = self.driver.fetcher
        if fetcher is None:
            raise StartFailure("qemu: the supervisor has no image fetcher")
        try:
            self.fetched = await Deferred.fromCoroutine(fetcher.fetch(self.job["image"]))
        except ImageFetchError as e:
            self._end_now(("failed", "image_error", e.message))
            return
        self._check()
        image = self.fetched.image
        if image.kind == "qemu":
            self.disk = disk_info(self.job, self.fetched)
        if image.kind != "qemu" or (not image.qcow2 and image.kernel is None):
            self._end_now(("failed", "image_error",
                           f"qemu: image {self.fetched.digest} is not a bootable QEMU image "
                           f"({image.kind})"))
            return

        self.reporter.stage("allocating")
        long = self.paths.too_long()
        if long is not None:
            raise StartFailure(f"qemu: socket path {long} is too long; set a shorter "
                               "qemu.work_dir")
        await self.driver.in_thread(_make_work_dir, self.paths.work_dir)
        self.ssh_port = free_port()
        self._check()

        self.reporter.stage("provisioning")
        if image.qcow2:
            top = self.fetched.path(image.top)  # type: ignore[arg-type]
            size = await self._virtual_size(top)
            self._check()
            await self._run_tool(overlay_command(self.settings, top, self.paths.overlay, size),
                                 "creating the overlay")
        self._check()
        kernel = self.fetched.path(image.kernel) if image.kernel else None
        accel = await self.driver.accel.choose(kernel)
        self._check()

        self.reporter.stage("booting")
        args = qemu_command(self.settings, job_id=self.job_id, image=image,
                            path_of=self.fetched.path, paths=self.paths, accel=accel,
                            ssh_port=self.ssh_port)
        self.log.info("qemu: job {job}: starting QEMU ({accel}): {args}", job=self.job_id,
                      accel=accel, args=" ".join(args))
        self._spawn(args)
        await self._attach()
        self._check()
        assert self.qmp is not None
        await self.qmp.execute("cont")
        self.running = True
        self._check()
        await self.driver.in_thread(_write_json, self.paths.state, self._state())
        self.log.info("qemu: job {job}: the guest runs (pid {pid}, ssh on 127.0.0.1:{port})",
                      job=self.job_id, pid=self.pid, port=self.ssh_port)
        if self.settings.ready == "boot":
            self._ready()
        else:
            self.boot_timer = self.reactor.callLater(self.settings.boot_timeout,
                                                     self._boot_timed_out)

    async def _virtual_size(self, path: str) -> int:
        out = await self._run_tool([self.settings.img_binary, "info", "--output=json",
                                    "-f", "qcow2", path], "reading the top layer")
        try:
            return int(json.loads(out)["virtual-size"])
        except (ValueError, KeyError, TypeError) as e:
            raise StartFailure(f"qemu: qemu-img info {path}: unexpected output ({e})") from None

    async def _run_tool(self, args: list[str], what: str) -> str:
        try:
            return await run_tool(self.reactor, args, what)
        except ToolError as e:
            raise StartFailure(str(e)) from None

    def _spawn(self, args: list[str]) -> None:
        log_fd = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            self.process = self.reactor.spawnProcess(
                _VmProcess(self), args[0], args, env=dict(os.environ),
                path=self.paths.work_dir, childFDs={0: null_fd, 1: log_fd, 2: log_fd})
        except OSError as e:
            raise StartFailure(f"qemu: cannot run {args[0]}: {e}") from None
        finally:
            os.close(log_fd)
            os.close(null_fd)
        self.pid = self.process.pid
        self.alive = True

    async def _attach(self) -> None:
        """Connect to QMP, the console and the agent (QEMU waits, paused)."""
        await self._connect_sockets(self.settings.start_timeout)
        await self._start_bridge()

    async def _connect_sockets(self, timeout: float) -> QMPClient:
        """Connect to QMP, the console and the agent, each within ``timeout`` seconds of
        now in all; the QMP client once it is ready."""
        deadline = self.reactor.seconds() + timeout
        qmp = QMPClient(self._qmp_event)
        await self._connect(self.paths.qmp, qmp, deadline)
        self.qmp = qmp
        qmp.closed.addCallback(lambda _: self._qmp_closed())
        await qmp.ready
        self.console = _Console(self)
        await self._connect(self.paths.console, self.console, deadline)
        self.agent = AgentProtocol(self)
        await self._connect(self.paths.agent, self.agent, deadline)
        return qmp

    async def _connect(self, path: str, protocol: Protocol, deadline: float) -> None:
        while True:
            if not self.alive:
                raise StartFailure("qemu: QEMU exited")
            self._check()
            try:
                await connectProtocol(UNIXClientEndpoint(self.reactor, path, timeout=5),
                                      protocol)
                return
            except CancelledError:
                raise
            except Exception as e:
                if self.reactor.seconds() > deadline:
                    raise StartFailure(f"qemu: cannot connect to {path}: {e}") from None
            await deferLater(self.reactor, CONNECT_RETRY, lambda: None)

    async def _start_bridge(self) -> None:
        bridge = ConsoleBridge(self.reactor, self._console_input, name=f"console {self.job_id}")
        try:
            address = await bridge.listen()
        except Exception as e:
            self.log.warn("qemu: job {job}: no console bridge: {e}", job=self.job_id, e=e)
            return
        self.bridge = bridge
        # Only sshd authenticates its users (a public port); the console needs a token.
        self.services = {"ssh": ("127.0.0.1", self.ssh_port, True), "console": address}
        self.reporter.services(dict(self.services))

    def _console_input(self, data: bytes) -> None:
        if self.console is not None and self.console.transport is not None:
            self.console.transport.write(data)

    def _start_failed(self, failure: Failure) -> None:
        if self.ending == ("detached",):
            return
        if self.ending is not None:  # a stop, or the job already ended
            self._finish_later()
            return
        if failure.check(StartFailure):
            message = str(failure.value)
        elif failure.check(QMPError):
            message = f"qemu: QMP: {failure.value}"
        else:
            self.log.failure("qemu: job {job}: start-up failed", failure, job=self.job_id)
            message = f"qemu: internal error while starting: {failure.value!r}"
        self.ending = ("failed", "host_start_failure", message)
        self.with_log = True
        self._finish_later()

    # -- the running VM ------------------------------------------------------------------

    def _ready(self) -> None:
        if self.ready_reported or self.ending is not None:
            return
        self.ready_reported = True
        self._cancel_boot_timer()
        self.reporter.ready()

    def _cancel_boot_timer(self) -> None:
        if self.boot_timer is not None and self.boot_timer.active():
            self.boot_timer.cancel()
        self.boot_timer = None

    def _boot_timed_out(self) -> None:
        self.boot_timer = None
        if self.ending is None and not self.ready_reported:
            self._end_now(("failed", "host_start_failure",
                           f"qemu: the guest's agent did not say ready within "
                           f"{self.settings.boot_timeout:g} s"), graceful=False)

    def agent_ready(self) -> None:
        self._ready()

    def agent_exit(self, status: int, message: str) -> None:
        if self.ending is not None or self.held or self.exit_pending is not None:
            if self.held:
                self.log.info("qemu: job {job}: the held guest's agent says exit {status}; "
                              "ignored", job=self.job_id, status=status)
            return
        self.log.info("qemu: job {job}: the agent says exit {status}", job=self.job_id,
                      status=status)
        if hold_for(self.job, "workload_exited", status) is not None:
            # Held on failure: the VM stays, unless the guest powers itself off.
            self.exit_pending = (status, message)
            self.settle_timer = self.reactor.callLater(HOLD_SETTLE, self._hold_now)
            return
        self.reporter.terminating()
        self._end_now(("exited", status, message))

    def _hold_now(self) -> None:
        """The held job's failing exit, with the guest still up: report it, keep the VM."""
        self.settle_timer = None
        pending, self.exit_pending = self.exit_pending, None
        if pending is None or self.ending is not None or not self.alive:
            return
        self.hold()
        self.log.info("qemu: job {job}: exit {status}; the VM is held (pid {pid})",
                      job=self.job_id, status=pending[0], pid=self.pid)
        self.reporter.exited(*pending)

    def hold(self) -> None:
        """The job is over but its VM is held as it is (the runner's ``hold``): no boot
        timeout, no end from the agent or a guest power-off report; a stop tears down."""
        self.held = True
        self._cancel_boot_timer()
        self._cancel_settle()  # a failing exit still settling: the job is over anyway
        self.exit_pending = None

    def _cancel_settle(self) -> None:
        if self.settle_timer is not None and self.settle_timer.active():
            self.settle_timer.cancel()
        self.settle_timer = None

    def agent_result(self, message: dict[str, Any]) -> None:
        if self.ending is None:
            self.reporter.result(message)

    def agent_ssh_host_key(self, key: str) -> None:
        if self.ending is not None:
            return
        try:
            line = sshkeys.parse(key, comment_allowed=False).line
        except sshkeys.BadKey as e:
            self.log.warn("qemu: job {job}: the agent's SSH host key ignored: {why}",
                          job=self.job_id, why=str(e))
            return
        if line not in self.host_keys and len(self.host_keys) < MAX_HOST_KEYS:
            self.host_keys.append(line)
            self.reporter.ssh_host_keys(list(self.host_keys))

    def agent_service(self, name: str, port: int) -> None:
        if self.ending is not None:
            return
        if name in RESERVED_SERVICES and not (name == "ssh" and port == self.settings.ssh_port):
            self.log.warn("qemu: job {job}: the agent's service {name} ignored (reserved)",
                          job=self.job_id, name=name)
            return
        Deferred.fromCoroutine(self._forward(name, port)).addErrback(
            lambda f: self.log.failure("qemu: forwarding {name}", f, name=name))

    async def _forward(self, name: str, port: int) -> None:
        host_port = self.forwards.get(port)
        if host_port is None:
            if port == self.settings.ssh_port:
                host_port = self.ssh_port
            else:
                host_port = free_port()
                assert self.qmp is not None
                out = await self.qmp.hmp(f"hostfwd_add net0 tcp:127.0.0.1:{host_port}-:{port}")
                if out.strip():
                    self.log.warn("qemu: job {job}: hostfwd_add for {name}: {out}",
                                  job=self.job_id, name=name, out=out.strip())
                    return
            self.forwards[port] = host_port
        # An agent's service does not authenticate its users unless it is the image's sshd.
        service: tuple[str, int] | tuple[str, int, bool] = (
            ("127.0.0.1", host_port, True) if name == "ssh" and host_port == self.ssh_port
            else ("127.0.0.1", host_port))
        if self.ending is None and self.services.get(name) != service:
            self.services[name] = service
            self.reporter.services(dict(self.services))

    def agent_invalid(self, problem: str) -> None:
        self.log.warn("qemu: job {job}: agent: {problem}", job=self.job_id, problem=problem)

    def _qmp_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "SHUTDOWN":
            self.log.info("qemu: job {job}: shutdown ({data})", job=self.job_id, data=data)
            if (self.settings.ready == "boot" and data.get("guest") and self.running
                    and self.ending is None and not self.held):
                self.reporter.terminating()
                self.ending = ("exited", 0, "the guest powered off")

    def _qmp_closed(self) -> None:
        if self.process is None and self.alive:  # adopted: QMP is how we see the end
            Deferred.fromCoroutine(self._watch_adopted_end())

    async def _watch_adopted_end(self) -> None:
        for _ in range(int(KILL_WAIT / 0.1)):
            if self.pid is None or not pid_alive(self.pid):
                break
            await deferLater(self.reactor, 0.1, lambda: None)
        self.vm_ended(None)

    def vm_ended(self, code: Any) -> None:
        """QEMU is gone."""
        if not self.alive:
            return
        self.alive = False
        self.exit_code = code
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(None)
        if self.ending is None and self.exit_pending is not None:
            # A held job's guest powered itself off after its failing exit.
            self._cancel_settle()
            (status, message), self.exit_pending = self.exit_pending, None
            self.log.info("qemu: job {job}: {what}", job=self.job_id, what=POWERED_OFF)
            self.reporter.terminating()
            self.ending = ("exited", status, f"{message} ({POWERED_OFF})" if message
                           else POWERED_OFF)
            self._finish_later()
        elif self.ending is None and self.held:
            self.log.info("qemu: job {job}: the held VM is gone (QEMU exited: {code}); "
                          "the hold is over", job=self.job_id, code=code)
            self.ending = ("failed", "host_dropped_job", f"qemu: the held VM is gone ({code})")
            self._finish_later()
        elif self.ending is None:
            self.log.warn("qemu: job {job}: QEMU exited ({code}) on its own", job=self.job_id,
                          code=code)
            if self.running:
                self.ending = ("failed", "host_dropped_job",
                               f"qemu: QEMU exited ({code}) before the workload's exit")
            else:
                self.ending = ("failed", "host_start_failure", f"qemu: QEMU exited ({code})")
            self.with_log = True
            self._finish_later()
        elif self.ending != ("detached",) and (self.main is None or self.main.called):
            # The end was decided (the guest powered off with qemu.ready = "boot"), and
            # nothing else would finish: QEMU is gone, tear down and report.
            self._finish_later()

    def _wait_exit(self, seconds: float) -> Deferred[bool]:
        """Fires True when QEMU is gone, or False after ``seconds``."""
        if not self.alive:
            return succeed(True)
        d: Deferred[None] = Deferred()
        self._exit_waiters.append(d)
        out: Deferred[bool] = Deferred()
        timer = self.reactor.callLater(seconds, lambda: out.called or out.callback(False))

        def gone(_: None) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(True)

        d.addCallback(gone)
        return out

    # -- ending ----------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        if self.ending is not None:
            return
        self._cancel_settle()
        self.exit_pending = None
        self.ending = ("stopped", reason, "qemu: stopped")
        self.graceful = True
        if self.main is not None and not self.main.called:
            self.main.cancel()  # _start_failed finishes
            return
        self._finish_later()

    def _end_now(self, ending: tuple[Any, ...], graceful: bool = True) -> None:
        if self.ending is not None and self.ending != ending:
            return
        self.ending = ending
        self.graceful = graceful
        if self.main is not None and not self.main.called:
            return  # _start_up returns or raises _Stopped; main's callbacks finish
        self._finish_later()

    def _finish_later(self) -> None:
        if self._finishing:
            return
        self._finishing = True
        Deferred.fromCoroutine(self._finish(self.graceful, self.with_log)).addErrback(
            lambda f: self.log.failure("qemu: job {job}: teardown failed", f, job=self.job_id))

    async def _finish(self, graceful: bool, with_log: bool) -> None:
        """Power the VM off, keep its disk (``snapshot.py``), remove every other trace of
        the job, then report its end."""
        self._cancel_boot_timer()
        self._cancel_settle()
        await self._power_off(graceful and self.running)
        tail = read_tail(self.paths.log) if with_log else ""
        for transport_of in (self.qmp, self.console, self.agent):
            if transport_of is not None and transport_of.transport is not None:
                transport_of.transport.abortConnection()
        if self.bridge is not None:
            bridge, self.bridge = self.bridge, None
            await bridge.close()
        if not self.alive and self.disk is not None:  # QEMU is gone: keep its disk
            try:
                await self.driver.kept.keep(self.job_id, self.paths.overlay, self.disk)
            except Exception:
                self.log.failure("qemu: job {job}: cannot keep its disk", job=self.job_id)
        await self.driver.in_thread(shutil.rmtree, self.paths.work_dir, True)
        self.release()
        if self.driver.run is self:
            self.driver.run = None
        assert self.ending is not None
        kind, *args = self.ending
        if kind == "exited":
            self.reporter.exited(args[0], args[1])
        elif kind == "stopped":
            self.reporter.stopped(args[0], args[1])
        else:
            message = args[1]
            if tail:
                message = f"{message}; QEMU's output: {tail}"
            self.reporter.failed(args[0], message[-4000:])
        self.finished.callback(None)

    async def _power_off(self, graceful: bool) -> None:
        """system_powerdown, then quit after ``shutdown_timeout``, then SIGKILL."""
        if not self.alive:
            return
        qmp = self.qmp if self.qmp is not None and self.qmp.connected_ else None
        if graceful and qmp is not None:
            if await self._wait_exit(0.5):  # the guest may be powering off by itself
                return
            qmp.execute("system_powerdown").addErrback(lambda _: None)
            if await self._wait_exit(self.settings.shutdown_timeout):
                return
            self.log.info("qemu: job {job}: the guest did not power off within {s:g} s; "
                          "quitting", job=self.job_id, s=self.settings.shutdown_timeout)
        if qmp is not None and qmp.connected_:
            qmp.execute("quit").addErrback(lambda _: None)
            if await self._wait_exit(self.settings.quit_timeout):
                return
        self.log.warn("qemu: job {job}: killing QEMU (pid {pid})", job=self.job_id,
                      pid=self.pid)
        self._kill()
        if not await self._wait_exit(KILL_WAIT):
            self.log.error("qemu: job {job}: QEMU (pid {pid}) survived SIGKILL",
                           job=self.job_id, pid=self.pid)

    def _kill(self) -> None:
        try:
            if self.process is not None:
                self.process.signalProcess("KILL")
            elif self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)
        except Exception:
            pass

    def release(self) -> None:
        fetcher = self.driver.fetcher
        if fetcher is not None:
            if self.fetched is not None:
                fetcher.release(self.fetched)
            if self.pinned:
                fetcher.release_digests(self.pinned)
        self.fetched = None
        self.pinned = []

    def detach(self) -> None:
        """Forget the VM without touching it (the supervisor stops)."""
        self.ending = self.ending or ("detached",)
        self._cancel_boot_timer()
        self._cancel_settle()
        if self.main is not None and not self.main.called:
            self.main.cancel()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        for p in (self.qmp, self.console, self.agent):
            if p is not None and p.transport is not None:
                p.transport.loseConnection()
        if self.bridge is not None:
            Deferred.fromCoroutine(self.bridge.close())
            self.bridge = None
        self.release()

    # -- adoption ------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        assert self.fetched is not None
        return {"job": self.job_id, "pid": self.pid, "ssh_port": self.ssh_port,
                "ready": self.settings.ready, "layers": list(self.fetched.layers),
                "forwards": {str(k): v for k, v in self.forwards.items()}, "disk": self.disk}

    def adopt(self, state: dict[str, Any]) -> None:
        """Take over a VM described by its ``run.json`` (alive, checked by the caller)."""
        self.pid = int(state["pid"])
        self.ssh_port = int(state["ssh_port"])
        self.forwards = {int(k): int(v) for k, v in (state.get("forwards") or {}).items()}
        self.alive = True
        self.running = True
        self.ready_reported = True  # the runner knows whether it was; never report again
        self.pinned = [str(d) for d in state.get("layers") or []]
        self.disk = state.get("disk") if isinstance(state.get("disk"), dict) else None
        if self.driver.fetcher is not None and self.pinned:
            # With the job's image, the fetcher renews its cache lease too.
            self.driver.fetcher.pin(self.pinned, image=self.job.get("image"))
        self._watch = LoopingCall(self._check_pid)
        self._watch.clock = self.reactor
        self._watch.start(1.0, now=False)
        self.main = Deferred.fromCoroutine(self._reattach())
        # A stop while re-attaching (even from inside its services report) finishes after.
        self.main.addCallbacks(self._start_done, self._reattach_failed)

    def _check_pid(self) -> None:
        if self.pid is not None and not pid_alive(self.pid):
            self.vm_ended(None)

    async def _reattach(self) -> None:
        qmp = await self._connect_sockets(10.0)
        await qmp.execute("cont")  # in case the supervisor stopped while it was paused
        await self._start_bridge()
        for guest, host in self.forwards.items():
            if guest != self.settings.ssh_port:
                self.services[f"port-{guest}"] = ("127.0.0.1", host)
        self.log.info("qemu: job {job}: re-attached to QEMU pid {pid}", job=self.job_id,
                      pid=self.pid)

    def _reattach_failed(self, failure: Failure) -> None:
        if self.ending == ("detached",):
            return
        if self.ending is not None:
            self._finish_later()
            return
        self.ending = ("failed", "host_dropped_job",
                       f"qemu: cannot re-attach to QEMU after a restart: {failure.value}")
        self._finish_later()


def _make_work_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a leftover of a job that did not end cleanly
    os.makedirs(path, mode=0o700)


def _write_json(path: str, value: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@implementer(IHostDriver, IHostSnapshots)
class QemuDriver(SingleJobDriver):
    """Runs each job in a fresh QEMU VM; an ended job's disk is kept for snapshots.
    See ``docs/qemu.md``."""

    name = "qemu"
    kinds = ("qemu",)
    holds = True  # keeps a held job's VM when it fails (hold_on_failure, docs/qemu.md)
    log = Logger()

    def __init__(self, reactor: Any, settings: Any, *, fetcher: ImageFetcher | None = None,
                 accel: AccelChooser | None = None):
        self.reactor = reactor
        self.settings = settings
        self.fetcher = fetcher
        self.accel = accel or AccelChooser(reactor, settings)
        self.run: _Run | None = None
        self.kept = KeptDisks(reactor, settings, fetcher, self.in_thread)
        self._snapshots: dict[tuple[str, str, str], list[Deferred[str]]] = {}
        self.kept.restore()  # in a thread: stale kept disks go, fresh ones are pinned again

    def in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        """Run blocking file work in the reactor's thread pool (inline without one)."""
        if hasattr(self.reactor, "getThreadPool"):
            return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)
        return maybeDeferred(fn, *args)

    def start(self, job: dict[str, Any], reporter: IJobReporter) -> Deferred[None]:
        if (answer := self.busy(job, "qemu: the host")) is not None:
            return answer
        run = _Run(self, job, reporter)
        self.run = run
        self.reactor.callLater(0, run.begin)  # report only after start() returned
        return succeed(None)

    def hold(self, job_id: str) -> None:
        """The runner holds ended job ``job_id``'s host: keep its VM as it is until
        ``stop(job_id, reason)`` (the hold's release or expiry)."""
        if self.run is not None and self.run.job_id == job_id:
            self.run.hold()

    def adopt(self, job: dict[str, Any], reporter: IJobReporter) -> bool:
        return self._adopt(job, reporter, held=False)

    def adopt_held(self, job: dict[str, Any], reporter: IJobReporter) -> bool:
        """After a restart: take over the still-running VM of ``job``, whose hold the
        runner journaled; ``stop`` tears it down. ``False`` if there is none to take
        over, and then no QEMU of the job is left running (an unreachable one is killed)."""
        return self._adopt(job, reporter, held=True)

    def _adopt(self, job: dict[str, Any], reporter: IJobReporter, *, held: bool) -> bool:
        run = _Run(self, job, reporter)
        if self.run is not None:
            self.log.error("qemu: job {job}: cannot adopt it, job {other} is adopted",
                           job=run.job_id, other=self.run.job_id)
            return False
        state = _read_json(run.paths.state)
        if state is None or state.get("job") != run.job_id:
            self.log.info("qemu: job {job}: nothing to adopt", job=run.job_id)
            self._discard(run)
            return False
        pid = state.get("pid")
        disk = state.get("disk") if isinstance(state.get("disk"), dict) else None
        if not isinstance(pid, int) or not pid_alive(pid) or not _is_our_qemu(pid, run):
            self.log.info("qemu: job {job}: QEMU (pid {pid}) is gone", job=run.job_id, pid=pid)
            self._discard(run, disk)
            return False
        if not os.path.exists(run.paths.qmp):
            # Alive but unreachable: never leave a QEMU nobody controls.
            self.log.warn("qemu: job {job}: QEMU (pid {pid}) has no QMP socket; killing it",
                          job=run.job_id, pid=pid)
            self._discard(run, disk, kill=pid)
            return False
        self.run = run
        if held:
            run.hold()
        run.adopt(state)
        return True

    def _discard(self, run: _Run, disk: dict[str, Any] | None = None,
                 kill: int | None = None) -> None:
        """Remove a dead job's leftovers (its work directory), keeping its disk if
        ``disk`` says what a snapshot needs (QEMU is gone); first SIGKILL QEMU's pid
        ``kill`` (checked to be the job's QEMU) and wait for it to go."""
        async def discard() -> None:
            if kill is not None:
                await _kill_pid(self.reactor, kill, run)
            if disk is not None:
                await self.kept.keep(run.job_id, run.paths.overlay, disk)
            await self.in_thread(shutil.rmtree, run.paths.work_dir, True)

        Deferred.fromCoroutine(discard()).addErrback(
            lambda f: self.log.failure("qemu: job {job}: removing its leftovers", f,
                                       job=run.job_id))

    def snapshot(self, job_id: str, repository: str, store: str) -> Deferred[str]:
        """Push the kept disk of job ``job_id`` as a new image into ``repository`` on the
        image store ``store``: the job's image with the disk as a new top qcow2 layer.

        Fires with the new manifest's digest, or fails with :class:`SnapshotError`
        (``unknown_job``: no disk of that job is kept; ``failed``). A call for the
        same job, repository and store while one runs gets the same result.
        """
        key = (job_id, repository, store)
        waiters = self._snapshots.get(key)
        d: Deferred[str] = Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._snapshots[key] = [d]

        def done(result: Any) -> None:
            for waiter in self._snapshots.pop(key, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        running = Deferred.fromCoroutine(self.kept.snapshot(job_id, repository, store))
        running.addErrback(self._snapshot_error, job_id)
        running.addBoth(done)
        return d

    def _snapshot_error(self, failure: Failure, job_id: str) -> Failure:
        if not failure.check(SnapshotError):
            self.log.failure("qemu: job {job}: snapshot failed", failure, job=job_id)
            return Failure(SnapshotError("failed", f"qemu: internal error: {failure.value!r}"))
        return failure

    def shutdown(self) -> Deferred[None]:
        if self.run is not None:
            self.run.detach()
            self.run = None
        self.kept.close()
        return succeed(None)


async def _kill_pid(reactor: Any, pid: int, run: _Run) -> None:
    """SIGKILL the job's QEMU (not our child: poll until it is gone, ``KILL_WAIT`` s)."""
    try:
        if _is_our_qemu(pid, run):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        return
    for _ in range(int(KILL_WAIT / 0.1)):
        if not pid_alive(pid):
            return
        await deferLater(reactor, 0.1, lambda: None)
    run.log.error("qemu: job {job}: QEMU (pid {pid}) survived SIGKILL", job=run.job_id,
                  pid=pid)


def _is_our_qemu(pid: int, run: _Run) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return f"treadmill-{run.job_id}".encode() in cmdline
