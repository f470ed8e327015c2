"""The mock driver: a simulated host with configurable stages, timings and outcomes.

It is the workhorse of tests, demos and load tests (thousands of supervisors
in one process, see ``fleet.py``), so it keeps little state: one small run
object per job and at most one timer and one console loop.

A run goes through the stages of ``initializing`` (each for
``mock.stages.<stage>`` seconds, skipping ``mock.skip_stages``), reports
``ready``, and after ``mock.run_time`` seconds the workload exits with
``mock.exit_status`` and ``mock.message``. Failure injection:

- ``mock.fail_at = STAGE``: the host fails at the end of that stage:
  ``host_start_failure``, or ``image_error`` for ``fetching_image``;
- ``mock.crash_at = STAGE | "ready"``: the simulated host vanishes at the end
  of that stage (or when the workload would have exited): ``host_dropped_job``;
- ``mock.hang = true``: the host never gets to ``ready``; only a stop ends it;
- ``mock.refuse = CODE``: every start is refused with that ``start_job`` error.

Results (``docs/results.md``): at ``ready`` the host writes ``mock.console``
to its console (lines for console patterns) and its simulated agent sends
``mock.agent``, one agent message a line (``test_case``, ``summary``,
``exit``: an ``exit`` ends the job as a real agent's does).

Images: with ``mock.fetch = auto`` (the default) and an image fetcher (the
supervisor always gives one), the ``fetching_image`` stage *really* fetches
the job's image — from the cache mount, or the job's image stores — whenever
there is somewhere to fetch it from, and lasts at least
``mock.stages.fetching_image`` seconds; a fetch error ends the job with
``image_error`` and the fetcher's message. Without a cache mount and with no
stores in the job (jobs naming a bare digest), or with ``mock.fetch = never``,
the stage is only simulated. A skipped ``fetching_image`` fetches nothing.

Services: while ``ready``, with ``mock.echo = true`` (the default) and a
reactor that can listen, the host offers an ``echo`` service on a loopback
port (``echo.listen_echo``), which the supervisor publishes on the job's
rendezvous proxies.

A stage named by ``fail_at`` or ``crash_at`` is never skipped. Every
setting can be overridden per job by a job parameter of the same name
(``mock.exit_status = "3"``, ``mock.stages.booting = "2"``); an invalid or
unknown ``mock.*`` parameter refuses the start with ``bad_request``.

Holding (``hold_on_failure``, docs/jobs.md): when a held job's workload exits
with a non-zero status, the host reports the exit first and stays as it is
(its echo service too) until the job is stopped.

The simulated host lives in the supervisor's process, so it cannot be
adopted after a restart: the runner reports the job as ``host_dropped_job``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTCP
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from treadmill.common.config import BOOL, FLOAT, INT, STR, STRLIST, Setting, non_negative, one_of
from treadmill.protocol import agent
from treadmill.supervisor.drivers import REFUSALS, STAGES, IHostDriver, IJobReporter, StartRefused
from treadmill.supervisor.drivers.single import SingleJobDriver
from treadmill.supervisor.echo import listen_echo
from treadmill.supervisor.fetch import FetchedImage, ImageFetcher, ImageFetchError

__all__ = ["MOCK_SETTINGS", "SETTINGS", "MockDriver", "MockSettings", "make_driver"]

PARAMETER_PREFIX = "mock."
RESERVATION_PARAMETER = "treadmill.reservation"
"""Set (``"true"``) by the switchboard on a reservation's start: its workload never
exits by itself (docs/jobs.md, Reservations)."""
CONSOLE_TICK = 0.1  # seconds between console chunks (at least one byte per chunk)


_duration = non_negative(FLOAT)
"""Seconds: a number >= 0; ``inf`` means "forever"."""


def _int32(value: Any) -> int:
    number = INT(value)
    if not -(2**31) <= number < 2**31:
        raise ValueError(f"expected a 32-bit integer, got {number}")
    return number


def _text(value: Any) -> str:
    text = STR(value)
    if len(text) > 4096:
        raise ValueError("expected at most 4096 characters")
    return text


def _stages(value: Any) -> list[str]:
    names = STRLIST(value)
    for name in names:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r} (expected {', '.join(STAGES)})")
    return names


def _optional(kind: Any) -> Any:
    """``kind``, or None for an empty string or ``none``."""

    def check(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return kind(value)

    check.__name__ = getattr(kind, "__name__", "value")
    return check


MOCK_SETTINGS: tuple[Setting, ...] = (
    *(Setting(f"mock.stages.{stage}", _duration, 0.05,
              f"Mock driver: seconds spent in stage {stage}.") for stage in STAGES),
    Setting("mock.skip_stages", _stages, [], "Mock driver: stages the simulated host skips."),
    Setting("mock.run_time", _duration, 1.0,
            "Mock driver: seconds in ready before the workload exits (inf: until stopped)."),
    Setting("mock.exit_status", _int32, 0, "Mock driver: the workload's exit status."),
    Setting("mock.message", _text, "mock workload finished",
            "Mock driver: the workload's exit message."),
    Setting("mock.fail_at", _optional(one_of(*STAGES)), None,
            "Mock driver: fail at the end of this stage (host_start_failure; image_error "
            "for fetching_image)."),
    Setting("mock.hang", BOOL, False, "Mock driver: never reach ready; only a stop ends the job."),
    Setting("mock.crash_at", _optional(one_of(*STAGES, "ready")), None,
            "Mock driver: the simulated host vanishes at the end of this stage or of ready "
            "(host_dropped_job)."),
    Setting("mock.console_rate", non_negative(FLOAT, finite=True), 0.0,
            "Mock driver: bytes per second of console output while ready."),
    Setting("mock.console", _text, "",
            "Mock driver: text written to the console when the job becomes ready (lines for "
            "console patterns, docs/results.md)."),
    Setting("mock.agent", _text, "",
            "Mock driver: agent lines (docs/agent.md, one JSON message a line) the simulated "
            "agent sends when the job becomes ready; an exit ends the job."),
    Setting("mock.stop_time", _duration, 0.0, "Mock driver: seconds a stop takes."),
    Setting("mock.refuse", _optional(one_of(*REFUSALS)), None,
            "Mock driver: refuse every start with this error code."),
    Setting("mock.echo", BOOL, True,
            "Mock driver: offer an echo service (a loopback TCP port) while ready, which the "
            "supervisor publishes on the job's proxies."),
    Setting("mock.fetch", one_of("auto", "never"), "auto",
            "Mock driver: really fetch the job's image in fetching_image when a cache mount or "
            "the job's stores allow it (auto), or only simulate it (never)."),
)
_BY_KEY = {setting.key: setting for setting in MOCK_SETTINGS}


@dataclass(frozen=True)
class MockSettings:
    """How the simulated host behaves; see the module docstring."""

    durations: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.05))
    skip_stages: tuple[str, ...] = ()
    run_time: float = 1.0
    exit_status: int = 0
    message: str = "mock workload finished"
    fail_at: str | None = None
    hang: bool = False
    crash_at: str | None = None
    console_rate: float = 0.0
    console: str = ""
    agent: str = ""
    stop_time: float = 0.0
    refuse: str | None = None
    echo: bool = True
    fetch: str = "auto"

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> MockSettings:
        """From checked settings (``mock.*`` keys; missing keys take their defaults)."""
        def get(key: str) -> Any:
            return values.get(key, _BY_KEY[key].default)

        simple = {f.name: get(f"mock.{f.name}") for f in fields(cls)
                  if f.name not in ("durations", "skip_stages")}
        return cls(durations={stage: get(f"mock.stages.{stage}") for stage in STAGES},
                   skip_stages=tuple(get("mock.skip_stages")), **simple)

    def values(self) -> dict[str, Any]:
        """The settings as ``mock.*`` keys (the inverse of :meth:`from_values`)."""
        out: dict[str, Any] = {f"mock.stages.{s}": d for s, d in self.durations.items()}
        out["mock.skip_stages"] = list(self.skip_stages)
        for f in fields(self):
            if f.name not in ("durations", "skip_stages"):
                out[f"mock.{f.name}"] = getattr(self, f.name)
        return out

    def with_parameters(self, parameters: dict[str, Any]) -> MockSettings:
        """These settings overridden by a job's ``mock.*`` parameters.

        Raises :class:`StartRefused` (``bad_request``) for an unknown or invalid one.
        """
        overrides = {name: spec.get("value") for name, spec in parameters.items()
                     if name.startswith(PARAMETER_PREFIX)}
        if (parameters.get(RESERVATION_PARAMETER) or {}).get("value") == "true":
            overrides["mock.run_time"] = "inf"  # A reservation: held until stopped.
        if not overrides:
            return self
        values = self.values()
        for name, value in sorted(overrides.items()):
            setting = _BY_KEY.get(name)
            if setting is None:
                raise StartRefused("bad_request", f"unknown mock parameter {name}")
            try:
                values[name] = setting.kind(value)
            except ValueError as e:
                raise StartRefused("bad_request", f"parameter {name}: {e}") from None
        return MockSettings.from_values(values)

    def stages(self) -> list[str]:
        """The stages a run goes through."""
        keep = {self.fail_at, self.crash_at}
        return [s for s in STAGES if s not in self.skip_stages or s in keep]


class _Agent(agent.AgentHandler):
    """The simulated agent of a run (``mock.agent``)."""

    def __init__(self, run: _Run):
        self.run = run
        self.job_id = run.job_id

    def agent_result(self, message: dict[str, Any]) -> None:
        self.run.reporter.result(message)

    def agent_exit(self, status: int, message: str) -> None:
        self.run.exited(status, message)


class _Run:
    """One job on the simulated host."""

    __slots__ = ("_console_budget", "_console_carry", "_console_last", "_console_lines",
                 "_console_loop", "_driver", "_echo", "_fetching", "_timer", "fetched", "hold",
                 "image", "job_id", "phase", "reporter", "settings")

    def __init__(self, driver: MockDriver, job_id: str, settings: MockSettings,
                 reporter: IJobReporter, image: dict[str, Any] | None = None,
                 hold: bool = False):
        self._driver = driver
        self.hold = hold  # keep the host when the workload fails (hold_on_failure)
        self.job_id = job_id
        self.settings = settings
        self.reporter = reporter
        self.image = image
        self.phase = "assigned"
        self._fetching: Deferred[FetchedImage] | None = None
        self.fetched: FetchedImage | None = None
        self._timer: IDelayedCall | None = None
        self._console_loop: LoopingCall | None = None
        self._console_budget = 0.0
        self._console_last = 0.0
        self._console_lines = 0
        self._console_carry = b""
        self._echo: Any = None

    # -- timing ----------------------------------------------------------------------

    def _after(self, delay: float, fn: Any, *args: Any) -> None:
        self._cancel_timer()
        if math.isfinite(delay):
            self._timer = self._driver.reactor.callLater(delay, fn, *args)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def cancel(self) -> None:
        """Stop every timer and a fetch under way; report nothing more."""
        self._cancel_timer()
        if self._fetching is not None:
            fetching, self._fetching = self._fetching, None
            fetching.cancel()
        if self._console_loop is not None:
            if self._console_loop.running:
                self._console_loop.stop()
            self._console_loop = None
        if self._echo is not None:
            echo, self._echo = self._echo, None
            echo.stopListening()

    def release(self) -> None:
        """Unpin the fetched image's blobs (the job is over for this process)."""
        if self.fetched is not None and self._driver.fetcher is not None:
            self._driver.fetcher.release(self.fetched)
        self.fetched = None

    def _end(self) -> None:
        self.cancel()
        self.release()
        self.phase = "ended"
        if self._driver.run is self:
            self._driver.run = None

    # -- the run ---------------------------------------------------------------------

    def begin(self) -> None:
        self._stage(0)

    def _stage(self, index: int) -> None:
        stages = self.settings.stages()
        if index >= len(stages):
            self._booted()
            return
        stage = stages[index]
        self.phase = stage
        self.reporter.stage(stage)
        duration = self.settings.durations[stage]
        if stage == "fetching_image" and self._driver.fetches(self.settings, self.image):
            self._fetch(index, duration)
        else:
            self._end_stage(index, duration)

    def _end_stage(self, index: int, duration: float) -> None:
        stage = self.settings.stages()[index]
        if self.settings.fail_at == stage:
            self._after(duration, self._fail, stage)
        elif self.settings.crash_at == stage:
            self._after(duration, self._crash, stage)
        else:
            self._after(duration, self._stage, index + 1)

    def _fetch(self, index: int, duration: float) -> None:
        """Really fetch the job's image; the stage lasts at least ``duration``."""
        fetcher = self._driver.fetcher
        assert fetcher is not None and self.image is not None
        began = self._driver.reactor.seconds()
        fetching = Deferred.fromCoroutine(fetcher.fetch(self.image))
        self._fetching = fetching

        def fetched(result: FetchedImage) -> None:
            if self._fetching is not fetching:  # stopped meanwhile
                fetcher.release(result)
                return
            self._fetching = None
            self.fetched = result
            elapsed = self._driver.reactor.seconds() - began
            self._end_stage(index, max(0.0, duration - elapsed))

        def failed(failure: Failure) -> None:
            if self._fetching is not fetching:
                return  # stopped meanwhile (CancelledError) or already ended
            self._fetching = None
            self._end()
            if failure.check(ImageFetchError):
                self.reporter.failed("image_error", failure.value.message)
            elif failure.check(CancelledError):
                self.reporter.failed("image_error", "mock: fetching the image was cancelled")
            else:
                self._driver.log.failure("mock: fetching the image of job {job} failed",
                                         failure, job=self.job_id)
                self.reporter.failed("internal_error", "mock: fetching the image failed: "
                                     f"{failure.type.__name__}")

        fetching.addCallbacks(fetched, failed)

    def _booted(self) -> None:
        if self.settings.hang:
            self.phase = "hung"
            return
        self.phase = "ready"
        self.reporter.ready()
        self._start_echo()
        self._start_console()
        if self.settings.crash_at == "ready":
            self._after(self.settings.run_time, self._crash, "ready")
        else:
            self._after(self.settings.run_time, self._exit)
        if self.settings.console:
            self.reporter.console(self.settings.console.encode("utf-8"))
        if self.settings.agent:
            self._agent_says(self.settings.agent)

    def _agent_says(self, text: str) -> None:
        """The simulated agent's lines, through the real agent protocol's parser."""
        handler = _Agent(self)
        for raw in text.splitlines():
            if self.phase != "ready":
                return
            if not raw.strip():
                continue
            try:
                message = agent.parse(raw.encode("utf-8"))
            except agent.AgentError as e:
                self.reporter.console(f"[mock agent] invalid line: {e}\n".encode())
                continue
            agent.dispatch(handler, message, lambda _answer: None)

    def _exit(self) -> None:
        self.exited(self.settings.exit_status, self.settings.message)

    def exited(self, status: int, message: str) -> None:
        """The workload exited; a held job's failure leaves the host as it is."""
        if self.hold and status != 0:
            self._cancel_timer()
            self.phase = "held"
            self.reporter.exited(status, message)
            return
        self._end()
        self.reporter.exited(status, message)

    def _fail(self, stage: str) -> None:
        self._end()
        reason = "image_error" if stage == "fetching_image" else "host_start_failure"
        self.reporter.failed(reason, f"mock: injected failure at {stage}")

    def _crash(self, where: str) -> None:
        self._end()
        self.reporter.failed("host_dropped_job", f"mock: the simulated host vanished at {where}")

    def stop(self, reason: str) -> None:
        if self.phase in ("stopping", "ended"):
            return
        self.cancel()
        self.phase = "stopping"
        # Never report from inside stop(): the stop takes at least one turn.
        self._after(self.settings.stop_time, self._stopped, reason)

    def _stopped(self, reason: str) -> None:
        self._end()
        self.reporter.stopped(reason, "mock: stopped")

    def _start_echo(self) -> None:
        if not self.settings.echo or not IReactorTCP.providedBy(self._driver.reactor):
            return
        self._echo = listen_echo(self._driver.reactor)
        address = self._echo.getHost()
        # (host, port): the echo does not authenticate its users, so the proxy publishes
        # it behind a console token only (no public port).
        self.reporter.services({"echo": (address.host, address.port)})

    # -- console ---------------------------------------------------------------------

    def _start_console(self) -> None:
        rate = self.settings.console_rate
        if rate <= 0:
            return
        self._console_last = self._driver.reactor.seconds()
        loop = LoopingCall(self._console_tick)
        loop.clock = self._driver.reactor
        self._console_loop = loop
        loop.start(max(CONSOLE_TICK, 1.0 / rate), now=False)

    def _console_tick(self) -> None:
        now = self._driver.reactor.seconds()
        self._console_budget += self.settings.console_rate * (now - self._console_last)
        self._console_last = now
        size = int(self._console_budget)
        if size <= 0:
            return
        self._console_budget -= size
        chunk = bytearray(self._console_carry)
        while len(chunk) < size:
            self._console_lines += 1
            chunk += b"mock console %s line %08d\n" % (self.job_id[:8].encode(),
                                                        self._console_lines)
        self._console_carry = bytes(chunk[size:])
        self.reporter.console(bytes(chunk[:size]))


@implementer(IHostDriver)
class MockDriver(SingleJobDriver):
    """A simulated host. ``reactor`` only needs ``IReactorTime``."""

    name = "mock"
    holds = True  # keeps a held job's host when its workload fails (hold_on_failure)
    kinds: tuple[str, ...] | None = None  # any kind, unless a test or setting narrows it
    log = Logger()

    def __init__(self, reactor: Any, settings: MockSettings | None = None, *,
                 fetcher: ImageFetcher | None = None):
        self.reactor = reactor
        self.settings = settings or MockSettings()
        self.fetcher = fetcher
        self.run: _Run | None = None

    def fetches(self, settings: MockSettings, image: dict[str, Any] | None) -> bool:
        """Whether a run with ``settings`` really fetches ``image``."""
        return (settings.fetch == "auto" and self.fetcher is not None and image is not None
                and self.fetcher.can_fetch(image))

    def start(self, job: dict[str, Any], reporter: IJobReporter) -> Deferred[None]:
        try:
            settings = self.settings.with_parameters(job.get("parameters") or {})
        except StartRefused as e:
            return fail(e)
        if settings.refuse:
            return fail(StartRefused(settings.refuse,
                                     f"mock: refusing the job ({settings.refuse})"))
        if (answer := self.busy(job, "mock: the host")) is not None:
            return answer
        run = _Run(self, job["id"], settings, reporter, job.get("image"),
                   hold=self.holds and bool(job.get("hold_on_failure")))
        self.run = run
        # Report only after start() returned, as a real host would.
        run._after(0, run.begin)
        return succeed(None)

    def adopt(self, job: dict[str, Any], reporter: IJobReporter) -> bool:
        # The simulated host lived in the previous process: nothing to adopt.
        return False

    def shutdown(self) -> Deferred[None]:
        if self.run is not None:
            self.run.cancel()
            self.run.release()
            self.run = None
        return succeed(None)

    def configure(self, **changes: Any) -> None:
        """Change the defaults of later jobs (for the manhole and tests)."""
        self.settings = replace(self.settings, **changes)


SETTINGS = MOCK_SETTINGS


def make_driver(values: dict[str, Any], *, reactor: Any, state_dir: str,
                fetcher: ImageFetcher | None = None) -> MockDriver:
    """The mock driver of its ``mock.*`` ``values``."""
    return MockDriver(reactor, MockSettings.from_values(values), fetcher=fetcher)
