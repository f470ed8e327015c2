"""The serial driver: one board, one job at a time, on its console device."""


from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import serial as pyserial
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from treadmill.images import format as fmt
from treadmill.protocol.agent import AgentHandler, AgentProtocol, ConsoleAgentFilter
from treadmill.supervisor.console import ConsoleBridge
from treadmill.supervisor.drivers import IHostDriver, IJobReporter, StartRefused
from treadmill.supervisor.drivers.serial.settings import SerialSettings
from treadmill.supervisor.drivers.serial.tools import (
    CommandResult,
    TemplateError,
    expand,
    parameters_used,
    run_command,
)
from treadmill.supervisor.fetch import FetchedImage, ImageFetcher, ImageFetchError
from treadmill.supervisor.hold import agent_parameters, hold_for

__all__ = ["SerialDriver"]

PATTERN_WINDOW = 64 * 1024  # console bytes a pattern is searched in
PARITY = {"none": pyserial.PARITY_NONE, "even": pyserial.PARITY_EVEN,
          "odd": pyserial.PARITY_ODD, "mark": pyserial.PARITY_MARK,
          "space": pyserial.PARITY_SPACE}


def open_serial_port(protocol: Protocol, device: str, reactor: Any, **options: Any) -> Any:
    """A Twisted ``SerialPort`` (imported here: it needs a POSIX reactor)."""
    from twisted.internet.serialport import SerialPort

    return SerialPort(protocol, device, reactor, **options)


def _discard(d: Deferred[Any]) -> None:
    """Cancel ``d`` and swallow its outcome."""
    d.addErrback(lambda _: None)
    d.cancel()


class _StepFailed(Exception):
    """A step of preparing or cleaning the board failed; ``reason`` ends the job."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class _DeviceLost(Exception):
    """The console device vanished while the driver waited for its output."""


class _Console(Protocol):
    """The console device's protocol: everything goes to the driver."""

    def __init__(self, driver: SerialDriver):
        self.driver = driver

    def dataReceived(self, data: bytes) -> None:
        self.driver._console_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.driver._port_lost(self, reason)


class _Watch:
    """Waits for a regular expression in the console output."""

    def __init__(self, pattern: str):
        self.regex = re.compile(pattern.encode("utf-8"))
        self.buffer = b""
        self.done: Deferred[bytes] = Deferred()

    def feed(self, data: bytes) -> None:
        if self.done.called:
            return
        self.buffer = (self.buffer + data)[-PATTERN_WINDOW:]
        match = self.regex.search(self.buffer)
        if match:
            self.done.callback(match.group(0))


class _Run(AgentHandler):
    """One job on the board."""

    def __init__(self, driver: SerialDriver, job: dict[str, Any], reporter: IJobReporter,
                 params: dict[str, str]):
        self.driver = driver
        self.job = job
        self.job_id = job["id"]
        self.reporter = reporter
        self.job_parameters = params
        self.phase = "preparing"  # then "ready", ("held"), "finishing", "ended"
        self.task: Deferred[None] | None = None
        self.fetched: FetchedImage | None = None
        self.workdir: str | None = None
        self.touched = False  # the board was powered, cleaned or flashed for this job
        self.bridge: ConsoleBridge | None = None
        self.filter: ConsoleAgentFilter | None = None
        self.agent_port: Any = None
        self.booted = False  # the board was reset into the job's firmware
        self.ready_wait: Deferred[None] | None = None

    def console(self, data: bytes) -> None:
        self.reporter.console(data)
        if self.bridge is not None:
            self.bridge.output(data)

    def note(self, text: str) -> None:
        """A line of the driver's own on the job's console."""
        self.console(f"[treadmill serial] {text}\r\n".encode("utf-8", "replace"))

    # -- the agent (AgentHandler) ----------------------------------------------------------

    def _listening(self) -> bool:
        return self.phase in ("preparing", "ready") and self.booted

    def agent_ready(self) -> None:
        if self._listening():
            self.driver._ready(self)

    def agent_exit(self, status: int, message: str) -> None:
        if not self._listening():
            return
        if hold_for(self.job, "workload_exited", status) is not None:
            self.driver._hold_exit(self, status, message)
            return
        self.driver._end(self, "workload_exited",
                         lambda: self.reporter.exited(status, message))

    def agent_result(self, message: dict[str, Any]) -> None:
        if self._listening():
            self.reporter.result(message)

    def agent_service(self, name: str, port: int) -> None:
        self.note(f"agent: service {name} on port {port} ignored (a board has no network "
                  "path through the supervisor)")

    def agent_invalid(self, problem: str) -> None:
        self.driver.log.warn("{device}: job {job}: invalid agent line: {problem}",
                             device=self.driver.settings.device, job=self.job_id,
                             problem=problem)


@implementer(IHostDriver)
class SerialDriver:
    """A board on a serial port. ``open_port`` and ``commands`` are for tests."""

    name = "serial"
    kinds = ("board",)
    holds = True  # a held job's board stays powered when it fails (docs/serial.md)
    log = Logger()

    def __init__(self, reactor: Any, settings: SerialSettings, *,
                 fetcher: ImageFetcher | None = None,
                 open_port: Callable[..., Any] = open_serial_port,
                 commands: Callable[..., Deferred[CommandResult]] = run_command):
        self.reactor = reactor
        self.settings = settings
        self.fetcher = fetcher
        self._open_port = open_port
        self._commands = commands
        self.port: Any = None
        self._protocol: _Console | None = None
        self._closing: Deferred[None] | None = None
        self._absent_since: float | None = None
        self.port_error: str | None = None
        self._poll: LoopingCall | None = None
        self._watches: list[_Watch] = []
        self.run: _Run | None = None
        self.needs_check = True  # clean up and check the board before the next job
        self.health_problem: str | None = None
        self._shut = False
        self._opening = reactor.callLater(0, self._first_open)

    # -- the console device ----------------------------------------------------------------

    @property
    def current(self) -> str | None:
        """The id of the job on the board (a held one too), if any."""
        return self.run.job_id if self.run is not None else None

    @property
    def present(self) -> bool:
        """Whether the console device is open."""
        return self.port is not None

    def _first_open(self) -> None:
        self._opening = None
        if self._open() is not None:
            self.log.error("serial: cannot open {device}: {error}; retrying every {interval} s",
                           device=self.settings.device, error=self.port_error,
                           interval=self.settings.reopen_interval)
            self._start_polling()
        else:
            self.log.info("serial: console on {device} at {baud} baud",
                          device=self.settings.device, baud=self.settings.baud_rate)

    def _open(self) -> str | None:
        """Open the console device; the error, or None."""
        if self.port is not None or self._shut:
            return None
        s = self.settings
        protocol = _Console(self)
        self._protocol = protocol
        try:
            self.port = self._open_port(protocol, s.device, self.reactor, baudrate=s.baud_rate,
                                        bytesize=s.bytesize, parity=PARITY[s.parity],
                                        stopbits=s.stopbits, xonxoff=s.xonxoff,
                                        rtscts=s.rtscts)
        except (pyserial.SerialException, OSError, ValueError) as e:
            self._protocol = None
            self.port_error = str(e) or type(e).__name__
            return self.port_error
        self.port_error = None
        return None

    def _close_port(self) -> Deferred[None]:
        """Close the console device on purpose; fires once it is closed."""
        if self.port is None:
            return succeed(None)
        closing: Deferred[None] = Deferred()
        if self._closing is None:
            self._closing = Deferred()
            self._closing.addBoth(lambda result: closing.callback(None) or result)
            self.port.loseConnection()
        else:
            self._closing.addBoth(lambda result: closing.callback(None) or result)
        return closing

    def _port_lost(self, protocol: _Console, reason: Failure | None) -> None:
        if protocol is not self._protocol:
            return
        self.port = None
        self._protocol = None
        if self._closing is not None:
            closing, self._closing = self._closing, None
            closing.callback(None)
            return
        if self._shut:
            return
        problem = reason.getErrorMessage() if reason is not None else "closed"
        self.port_error = f"the device vanished ({problem})"
        self.log.error("serial: lost the console device {device}: {problem}; the board is "
                       "unplugged or powered down? Retrying every {interval} s",
                       device=self.settings.device, problem=problem,
                       interval=self.settings.reopen_interval)
        self.needs_check = True
        for watch in list(self._watches):
            if not watch.done.called:
                watch.done.errback(_DeviceLost(self.port_error))
        run = self.run
        if run is not None and run.phase in ("preparing", "ready", "held"):
            self._drop(run, f"serial device {self.settings.device} vanished ({problem})")
        self._start_polling()

    def _start_polling(self) -> None:
        if self._poll is not None or self._shut:
            return
        self._absent_since = self.reactor.seconds()
        self._poll = LoopingCall(self._try_reopen)
        self._poll.clock = self.reactor
        self._poll.start(self.settings.reopen_interval, now=False)

    def _stop_polling(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None

    def _try_reopen(self) -> None:
        if self.port is not None:
            self._stop_polling()
            return
        if self._open() is None:
            self._stop_polling()
            self.log.info("serial: {device} is back after {seconds:.1f} s",
                          device=self.settings.device,
                          seconds=self.reactor.seconds() - (self._absent_since or 0))

    def _console_data(self, data: bytes) -> None:
        for watch in list(self._watches):
            watch.feed(data)
        run = self.run
        if run is None or run.phase == "ended":
            return
        if run.filter is not None:
            run.filter.feed(data)
        else:
            run.console(data)

    def write(self, data: bytes) -> None:
        """Console input (users through the bridge, agent replies)."""
        if self.port is not None:
            self.port.write(data)

    async def _reopen(self) -> None:
        if self.port is None:
            error = self._open()
            if error is not None:
                self._start_polling()
                raise _StepFailed("host_start_failure",
                                  f"serial device {self.settings.device} is not usable: {error}")
            self._stop_polling()

    def _wait_for(self, pattern: str, timeout: float) -> Deferred[bytes]:
        watch = _Watch(pattern)
        self._watches.append(watch)

        def done(result: Any) -> Any:
            self._watches.remove(watch)
            return result

        watch.done.addBoth(done)
        watch.done.addTimeout(timeout, self.reactor)
        return watch.done

    # -- steps -----------------------------------------------------------------------------

    async def _command(self, run: _Run, what: str, argv: list[str], timeout: float,
                       release: bool = False) -> None:
        """Run a configured command (output on the job's console); ``_StepFailed`` if it fails."""
        name = os.path.basename(argv[0]) if argv else "?"
        run.note(f"{what}: running {name}")
        if release and self.settings.flash_release_port:
            await self._close_port()
        try:
            result = await self._commands(self.reactor, argv, timeout, run.console)
        finally:
            if release and self.settings.flash_release_port and not self._shut:
                await self._reopen()
        if not result.ok:
            message = result.describe(what, timeout)
            run.note(message)
            raise _StepFailed("host_start_failure", message)

    def _expand(self, run: _Run, argv: list[str], firmware: dict[str, str] | None = None,
                targets: dict[str, str | None] | None = None) -> list[str]:
        try:
            return expand(argv, port=self.settings.device, job=run.job_id, firmware=firmware,
                          targets=targets, params=run.job_parameters)
        except TemplateError as e:
            reason = "image_error" if e.kind == "image" else "host_start_failure"
            raise _StepFailed(reason, str(e)) from None

    async def _pulse(self, run: _Run) -> None:
        s = self.settings
        if self.port is None:
            raise _StepFailed("host_start_failure",
                              f"cannot pulse {s.reset_line.upper()}: {s.device} is not open")
        setter = self.port.setDTR if s.reset_line == "dtr" else self.port.setRTS
        active = not s.reset_invert
        run.note(f"reset: pulsing {s.reset_line.upper()} for {s.reset_pulse:g} s")
        try:
            setter(active)
            await deferLater(self.reactor, s.reset_pulse, lambda: None)
            if self.port is not None:
                setter(not active)
        except (OSError, pyserial.SerialException) as e:
            raise _StepFailed("host_start_failure",
                              f"cannot pulse {s.reset_line.upper()} on {s.device}: {e}") from None

    async def _power_cycle(self, run: _Run) -> None:
        s = self.settings
        await self._command(run, "power off", self._expand(run, s.power_off), s.command_timeout)
        await deferLater(self.reactor, s.power_off_time, lambda: None)
        await self._command(run, "power on", self._expand(run, s.power_on), s.command_timeout)

    async def _reset(self, run: _Run) -> None:
        s = self.settings
        if s.reset_command:
            await self._command(run, "reset", self._expand(run, s.reset_command),
                                s.command_timeout)
        elif s.reset_line != "none":
            await self._pulse(run)
        elif s.power_off:
            await self._power_cycle(run)
        else:
            run.note("reset: no reset command, line or power control is configured")

    async def _halt(self, run: _Run) -> None:
        """Stop the board's workload at once: a power cycle if possible, else a reset."""
        if self.settings.power_off:
            await self._power_cycle(run)
        else:
            await self._reset(run)

    async def _clean(self, run: _Run, policy: str, reset: bool = True) -> None:
        """Apply a clean-state policy; ``reset=False`` leaves the reset to what follows."""
        s = self.settings
        if policy == "none":
            return
        if policy == "erase":
            await self._command(run, "erase", self._expand(run, s.erase_command),
                                s.command_timeout, release=True)
        elif policy == "command":
            await self._command(run, "clean", self._expand(run, s.clean_command),
                                s.command_timeout, release=True)
        if reset:
            await self._reset(run)

    async def _health(self, run: _Run) -> str | None:
        """Check the board; the problem, or None if it is healthy."""
        s = self.settings
        try:
            await self._reopen()
            if s.health_pattern:
                waiting = self._wait_for(s.health_pattern, s.health_timeout)
                try:
                    await self._reset(run)
                except BaseException:
                    _discard(waiting)
                    raise
                try:
                    await waiting
                except DeferredTimeout:
                    return (f"the console did not show /{s.health_pattern}/ within "
                            f"{s.health_timeout:g} s of a reset")
                except _DeviceLost as e:
                    return str(e)
            if s.health_command:
                await self._command(run, "health check", self._expand(run, s.health_command),
                                    s.command_timeout)
        except _StepFailed as e:
            return e.message
        return None

    async def _check(self, run: _Run) -> None:
        """Clean state and health before a job when the board needs it (and, with
        ``serial.health.before_job``, the health check before every job)."""
        s = self.settings
        if not self.needs_check:
            if not (s.health_before_job and (s.health_command or s.health_pattern)):
                return
            run.touched = True
            problem = await self._health(run)
            if problem is None:
                return
            self.needs_check = True
            self.health_problem = problem
            run.touched = False
            raise _StepFailed("host_start_failure", f"board health check failed: {problem}")
        run.touched = True
        try:
            await self._clean(run, self.settings.clean_after,
                              reset=not self.settings.health_pattern)
        except _StepFailed as e:
            problem: str | None = f"cleaning up: {e.message}"
        else:
            problem = await self._health(run)
        if problem is not None:
            self.health_problem = problem
            run.touched = False  # just cleaned and checked: nothing more to do after the job
            raise _StepFailed("host_start_failure", f"board health check failed: {problem}")
        self.needs_check = False
        self.health_problem = None

    # -- a job -------------------------------------------------------------------------------

    async def _prepare(self, run: _Run) -> None:
        s = self.settings
        r = run.reporter
        r.stage("starting")
        if self.port is None:
            error = self._open()
            if error is not None:
                self._start_polling()
                raise _StepFailed("host_start_failure",
                                  f"serial device {s.device} is absent or unusable: {error}")
            self._stop_polling()
        await self._check(run)

        r.stage("fetching_image")
        image = await self._fetch(run)
        firmware = self._link_firmware(run, image)
        targets = {f.name: f.target for f in image.image.firmware}
        argv, timeout = self._flash_argv(run, image.image, firmware, targets)

        r.stage("provisioning")
        run.touched = True
        if s.power_on:
            await self._command(run, "power on", self._expand(run, s.power_on), s.command_timeout)
        await self._clean(run, s.clean_before)
        if image.image.flash is not None and image.image.flash.erase:
            if s.erase_command:
                await self._command(run, "erase", self._expand(run, s.erase_command),
                                    s.command_timeout, release=True)
            else:
                run.note("erase: the image asks for it, but no serial.erase.command is set")
        await self._command(run, "flash", argv, timeout, release=True)

        r.stage("booting")
        await self._start_bridge(run)
        self._start_agent(run)
        if s.boot_ready == "agent":
            run.ready_wait = Deferred()
        waiting = self._wait_for(s.boot_pattern, s.boot_timeout) \
            if s.boot_ready == "pattern" and s.boot_pattern else None
        run.booted = True
        try:
            await self._reset(run)
        except BaseException:
            if waiting is not None:
                _discard(waiting)
            raise
        try:
            if waiting is not None:
                await waiting
            elif run.ready_wait is not None:
                run.ready_wait.addTimeout(s.boot_timeout, self.reactor)
                await run.ready_wait
        except DeferredTimeout:
            what = (f"the console did not show /{s.boot_pattern}/" if waiting is not None
                    else "the agent did not say ready")
            raise _StepFailed("host_start_failure",
                              f"{what} within {s.boot_timeout:g} s of the reset") from None
        except _DeviceLost:
            return  # _port_lost ended the job
        self._ready(run)

    def _ready(self, run: _Run) -> None:
        """The job is ready (the agent said so, or the boot is over)."""
        if run.phase == "preparing":
            run.phase = "ready"
            run.reporter.ready()
        if run.ready_wait is not None and not run.ready_wait.called:
            run.ready_wait.callback(None)

    async def _fetch(self, run: _Run) -> FetchedImage:
        if self.fetcher is None:
            raise _StepFailed("image_error", "serial: this supervisor cannot fetch images")
        try:
            fetched = await Deferred.fromCoroutine(self.fetcher.fetch(run.job["image"]))
        except ImageFetchError as e:
            raise _StepFailed("image_error", e.message) from None
        if run.phase != "preparing":
            self.fetcher.release(fetched)
            raise CancelledError()
        run.fetched = fetched
        if fetched.image.kind != "board":
            raise _StepFailed("image_error", f"image {fetched.name or fetched.digest} is a "
                              f"{fetched.image.kind} image; a serial host needs a board image")
        return fetched

    def _link_firmware(self, run: _Run, fetched: FetchedImage) -> dict[str, str]:
        """Symlink the firmware files by name into a private directory (tools go by names)."""
        run.workdir = tempfile.mkdtemp(prefix="treadmill-serial-")
        paths = {}
        for f in fetched.image.firmware:
            path = os.path.join(run.workdir, f.name)
            os.symlink(fetched.path(f.descriptor), path)
            paths[f.name] = path
        return paths

    def _flash_argv(self, run: _Run, image: fmt.TreadmillImage, firmware: dict[str, str],
                    targets: dict[str, str | None]) -> tuple[list[str], float]:
        s = self.settings
        spec = image.flash
        if spec is None:
            if not s.flash_command:
                raise _StepFailed("image_error", "the image has no flashing metadata "
                                  "(org.treadmill.flash) and this host has no "
                                  "serial.flash.command")
            return self._expand(run, s.flash_command, firmware, targets), s.flash_timeout
        prefix = s.flash_tools.get(spec.tool)
        if prefix is None and spec.tool == "custom":
            prefix = s.flash_command or None
        if prefix is None:
            offered = ", ".join(sorted(s.flash_tools)) or "none"
            raise _StepFailed("image_error", f"the image is flashed with {spec.tool}, which "
                              f"this host does not offer (its tools: {offered})")
        try:
            extra = fmt.expand_flash_args(spec, firmware, image, s.device)
        except (KeyError, ValueError) as e:
            raise _StepFailed("image_error", f"the image's flash arguments: {e}") from None
        return (self._expand(run, prefix, firmware, targets) + extra,
                spec.timeout or s.flash_timeout)

    async def _start_bridge(self, run: _Run) -> None:
        s = self.settings
        if not s.console_bridge or not IReactorTCP.providedBy(self.reactor):
            return
        bridge = ConsoleBridge(self.reactor, self._bridge_input, interface=s.console_interface)
        run.bridge = bridge
        address = await Deferred.fromCoroutine(bridge.listen())
        if run.bridge is bridge and run.phase in ("preparing", "ready"):
            run.reporter.services({"console": address})

    def _bridge_input(self, data: bytes) -> None:
        run = self.run
        if run is not None and run.phase in ("preparing", "ready", "held"):
            self.write(data)  # a held board's console is its owner's to type into

    def _start_agent(self, run: _Run) -> None:
        s = self.settings
        if s.agent_transport == "console":
            run.filter = ConsoleAgentFilter(run, run.console, self.write)
        elif s.agent_transport == "device":
            assert s.agent_device is not None
            try:
                run.agent_port = self._open_port(AgentProtocol(run), s.agent_device,
                                                 self.reactor, baudrate=s.agent_baud_rate)
            except (pyserial.SerialException, OSError, ValueError) as e:
                raise _StepFailed("host_start_failure",
                                  f"cannot open the agent device {s.agent_device}: {e}") from None

    # -- the job's life ------------------------------------------------------------------------

    def _begin(self, run: _Run) -> None:
        if run.phase != "preparing" or self.run is not run:
            return
        task = Deferred.fromCoroutine(self._prepare(run))
        run.task = task

        def failed(failure: Failure) -> None:
            if run.task is task:
                run.task = None
            if failure.check(CancelledError):
                return
            if failure.check(_StepFailed):
                error = failure.value
                self.log.warn("serial: job {job}: {reason}: {message}", job=run.job_id,
                              reason=error.reason, message=error.message)
                self._end(run, error.reason,
                          lambda: run.reporter.failed(error.reason, error.message))
                return
            self.log.failure("serial: job {job} failed", failure, job=run.job_id)
            self._end(run, "internal_error", lambda: run.reporter.failed(
                "internal_error", f"serial driver: {failure.type.__name__}: "
                f"{failure.getErrorMessage()}"))

        def done(_: Any) -> None:
            if run.task is task:
                run.task = None

        task.addCallbacks(done, failed)

    def _cancel_task(self, run: _Run) -> None:
        task, run.task = run.task, None
        if task is not None and not task.called:
            task.cancel()
        if run.ready_wait is not None and not run.ready_wait.called:
            _discard(run.ready_wait)

    def _end(self, run: _Run, reason: str, report: Callable[[], None],
             halt: bool = False) -> None:
        """End ``run``: terminating, clean up and check the board, then ``report()``."""
        if run.phase in ("finishing", "ended"):
            return
        run.phase = "finishing"
        run.filter = None
        self._cancel_task(run)
        finishing = Deferred.fromCoroutine(self._finish(run, reason, report, halt))
        finishing.addErrback(lambda f: self.log.failure("serial: cleaning up after job {job}",
                                                        f, job=run.job_id))

    async def _finish(self, run: _Run, reason: str, report: Callable[[], None],
                      halt: bool) -> None:
        await deferLater(self.reactor, 0, lambda: None)  # never report from inside stop()
        run.reporter.terminating(reason)
        await self._release(run)
        if run.touched and not self._shut:
            problem: str | None = None
            try:
                if self.port is None:
                    await self._reopen()
                if halt:
                    await self._halt(run)
                await self._clean(run, self.settings.clean_after,
                                  reset=not self.settings.health_pattern)
            except _StepFailed as e:
                problem = f"cleaning up: {e.message}"
            except Exception as e:
                self.log.failure("serial: cleaning up after job {job}", job=run.job_id)
                problem = f"cleaning up: {type(e).__name__}: {e}"
            if problem is None:
                try:
                    problem = await self._health(run)
                except Exception as e:
                    self.log.failure("serial: health check after job {job}", job=run.job_id)
                    problem = f"{type(e).__name__}: {e}"
            if problem is None:
                self.needs_check = False
                self.health_problem = None
            else:
                self.needs_check = True
                self.health_problem = problem
                run.note(f"board health check failed: {problem}")
                self.log.error("serial: after job {job}, the board on {device} is unhealthy: "
                               "{problem}; the next job checks again and fails "
                               "host_start_failure while it fails",
                               job=run.job_id, device=self.settings.device, problem=problem)
        if self._shut:
            return
        run.phase = "ended"
        if self.run is run:
            self.run = None
        report()

    async def _release(self, run: _Run) -> None:
        """Close the bridge and agent device, unpin the image, remove the work directory."""
        bridge, run.bridge = run.bridge, None
        if bridge is not None:
            run.reporter.services({})
            await Deferred.fromCoroutine(bridge.close())
        agent, run.agent_port = run.agent_port, None
        if agent is not None:
            agent.loseConnection()
        if run.fetched is not None and self.fetcher is not None:
            self.fetcher.release(run.fetched)
        run.fetched = None
        if run.workdir is not None:
            shutil.rmtree(run.workdir, ignore_errors=True)
            run.workdir = None

    def _hold_exit(self, run: _Run, status: int, message: str) -> None:
        """A held job's workload failed: report its exit, keep the board as it is."""
        self._hold_run(run)
        self.log.info("serial: job {job}: exit {status}; the board is held", job=run.job_id,
                      status=status)
        run.note(f"exit {status}: the board is held for debugging (powered, its console "
                 "open) until the hold ends")
        run.reporter.exited(status, message)

    def _hold_run(self, run: _Run) -> None:
        self._cancel_task(run)  # a boot still waited for: the board stays as it is
        run.phase = "held"

    def _drop(self, run: _Run, message: str) -> None:
        """The device vanished under a job: ``host_dropped_job`` without a clean-up."""
        run.phase = "ended"
        run.filter = None
        self._cancel_task(run)
        if self.run is run:
            self.run = None
        released = Deferred.fromCoroutine(self._release(run))
        released.addErrback(lambda f: self.log.failure("serial: releasing job {job}", f,
                                                       job=run.job_id))
        run.reporter.failed("host_dropped_job", message)

    # -- IHostDriver ---------------------------------------------------------------------------

    def start(self, job: dict[str, Any], reporter: IJobReporter) -> Deferred[None]:
        if self.run is not None:
            if self.run.job_id == job["id"]:
                return succeed(None)
            return Deferred.fromCoroutine(self._refuse(StartRefused(
                "internal_error", f"serial: the board still runs job {self.run.job_id}")))
        params = {}
        for name, spec in (job.get("parameters") or {}).items():
            value = spec.get("value", "") if isinstance(spec, dict) else spec
            params[name] = value if isinstance(value, str) else json.dumps(value)
        s = self.settings
        commands = [s.flash_command, s.erase_command, s.power_on, s.power_off, s.reset_command,
                    s.clean_command, s.health_command, *s.flash_tools.values()]
        missing = sorted(set().union(*(parameters_used(c) for c in commands)) - set(params))
        if missing:
            return Deferred.fromCoroutine(self._refuse(StartRefused(
                "bad_request", f"this host's commands need the job parameters "
                f"{', '.join(missing)}")))
        run = _Run(self, job, reporter, agent_parameters(job, params))
        self.run = run
        self.reactor.callLater(0, self._begin, run)
        return succeed(None)

    @staticmethod
    async def _refuse(error: StartRefused) -> None:
        raise error

    def hold(self, job_id: str) -> None:
        """The runner holds ended job ``job_id``'s board (its time is up): keep it powered
        and its console open, as it is, until ``stop`` (the hold's release or expiry)."""
        run = self.run
        if run is not None and run.job_id == job_id and run.phase in ("preparing", "ready"):
            self._hold_run(run)

    def stop(self, job_id: str, reason: str) -> Deferred[None]:
        run = self.run
        if (run is not None and run.job_id == job_id
                and run.phase in ("preparing", "ready", "held")):
            self.log.info("serial: stopping job {job} ({reason})", job=job_id, reason=reason)
            self._end(run, reason, lambda: run.reporter.stopped(reason, "serial: stopped"),
                      halt=True)
        return succeed(None)

    def adopt(self, job: dict[str, Any], reporter: IJobReporter) -> bool:
        # The console, the agent channel and the job's state lived in the previous
        # process: the board may still run, but nothing it said meanwhile was seen.
        # The runner reports host_dropped_job; the next job cleans and checks first.
        self.needs_check = True
        return False

    def shutdown(self) -> Deferred[None]:
        self._shut = True
        if self._opening is not None and self._opening.active():
            self._opening.cancel()
        self._stop_polling()
        run, self.run = self.run, None
        if run is not None:
            run.phase = "ended"
            self._cancel_task(run)
            if run.bridge is not None:
                Deferred.fromCoroutine(run.bridge.close())
                run.bridge = None
            if run.agent_port is not None:
                run.agent_port.loseConnection()
            if run.fetched is not None and self.fetcher is not None:
                self.fetcher.release(run.fetched)
            if run.workdir is not None:
                shutil.rmtree(run.workdir, ignore_errors=True)
        return self._close_port()

    def status(self) -> dict[str, Any]:
        """For the manhole: the device, the health, the current job."""
        return {"device": self.settings.device, "present": self.present,
                "port_error": self.port_error, "needs_check": self.needs_check,
                "health_problem": self.health_problem,
                "job": self.run.job_id if self.run else None,
                "phase": self.run.phase if self.run else None}

