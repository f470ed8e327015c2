"""The mock driver under a controlled clock: every outcome, override and fault."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from tests.fakes import reporter
from tests.fakes.fetcher import StubFetcher
from tests.supervisor.peer import JOB_A, JOB_B, job
from treadmill.supervisor.drivers import STAGES, IHostDriver, StartRefused
from treadmill.supervisor.drivers.mock import MOCK_SETTINGS, MockDriver, MockSettings


class Recorder(reporter.Recorder):
    """Records reports with the clock's time (to the microsecond)."""

    def _add(self, what: str, *args: Any) -> None:
        self.reports.append((round(self.clock.seconds(), 6), what, args))


def run(settings: MockSettings | None = None, seconds: float = 10.0, step: float = 0.01,
        job_start: dict[str, Any] | None = None) -> tuple[MockDriver, Recorder,
                                                          MemoryReactorClock]:
    clock = MemoryReactorClock()
    driver = MockDriver(clock, settings or MockSettings())
    reporter = Recorder(clock)
    d = driver.start(job_start or job(), reporter)
    assert d.called and d.result is None
    run_for(clock, seconds, step)
    return driver, reporter, clock


def run_for(clock: MemoryReactorClock, seconds: float, step: float) -> None:
    """Advance ``seconds``, in steps of at most ``step``, landing exactly on each
    scheduled call (so that reported times are exact)."""
    end = clock.seconds() + seconds
    while clock.seconds() < end:
        due = [c.getTime() for c in clock.getDelayedCalls()]
        target = min([end, clock.seconds() + step, *due])
        clock.advance(max(0.0, target - clock.seconds()))


def refused(settings: MockSettings, job_start: dict[str, Any]) -> StartRefused:
    clock = MemoryReactorClock()
    reporter = Recorder(clock)
    failures: list[Any] = []
    MockDriver(clock, settings).start(job_start, reporter).addErrback(failures.append)
    assert len(failures) == 1
    clock.pump([0.1] * 10)
    assert reporter.reports == []  # a refused start reports nothing
    return failures[0].value


def test_provides_the_interface() -> None:
    assert verifyObject(IHostDriver, MockDriver(MemoryReactorClock()))


def test_default_run_passes_every_stage_then_exits() -> None:
    _, reporter, _ = run()
    assert reporter.kinds == [*STAGES, "ready", "exited"]
    times = [t for t, _, _ in reporter.reports]
    assert times == pytest.approx([0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 1.25])
    assert reporter.last == ("exited", (0, "mock workload finished"))


def test_nothing_is_reported_from_inside_start() -> None:
    clock = MemoryReactorClock()
    reporter = Recorder(clock)
    MockDriver(clock).start(job(), reporter)
    assert reporter.reports == []
    clock.advance(0)
    assert reporter.kinds == ["starting"]


def test_configured_durations_skips_and_outcome() -> None:
    settings = MockSettings(durations={**dict.fromkeys(STAGES, 0.1), "booting": 1.0},
                            skip_stages=("fetching_image", "allocating"), run_time=2.0,
                            exit_status=7, message="bye")
    _, reporter, _ = run(settings)
    assert reporter.kinds == ["starting", "provisioning", "booting", "ready", "exited"]
    assert [t for t, _, _ in reporter.reports] == pytest.approx([0, 0.1, 0.2, 1.2, 3.2])
    assert reporter.last == ("exited", (7, "bye"))


def test_job_parameters_override_the_settings() -> None:
    start = job(exit_status=3, run_time=0.5, message="custom", **{"stages.booting": 2})
    _, reporter, _ = run(job_start=start)
    assert reporter.last == ("exited", (3, "custom"))
    times = {kind: t for (t, _, _), kind in zip(reporter.reports, reporter.kinds, strict=True)}
    assert times["ready"] - times["booting"] == pytest.approx(2.0)
    assert times["exited"] - times["ready"] == pytest.approx(0.5)


def test_skip_stages_parameter_takes_a_comma_list() -> None:
    _, reporter, _ = run(job_start=job(skip_stages="fetching_image,allocating,provisioning"))
    assert reporter.kinds == ["starting", "booting", "ready", "exited"]


@pytest.mark.parametrize("stage", STAGES)
def test_fail_at_each_stage(stage: str) -> None:
    _, reporter, _ = run(job_start=job(fail_at=stage))
    reason = "image_error" if stage == "fetching_image" else "host_start_failure"
    assert reporter.kinds == [*STAGES[:STAGES.index(stage) + 1], "failed"]
    assert reporter.last == ("failed", (reason, f"mock: injected failure at {stage}"))


def test_a_failing_stage_is_not_skipped() -> None:
    _, reporter, _ = run(MockSettings(skip_stages=("fetching_image",), fail_at="fetching_image"))
    assert reporter.kinds == ["starting", "fetching_image", "failed"]


def test_hang_never_reaches_ready_until_stopped() -> None:
    driver, reporter, clock = run(MockSettings(hang=True), seconds=30)
    assert reporter.kinds == list(STAGES)
    assert driver.current == JOB_A
    driver.stop(JOB_A, "execution_timeout")
    clock.advance(0)
    assert reporter.last == ("stopped", ("execution_timeout", "mock: stopped"))
    assert driver.current is None


def test_stop_while_ready_reports_stopped_promptly() -> None:
    driver, reporter, clock = run(MockSettings(run_time=float("inf")), seconds=1)
    assert reporter.kinds[-1] == "ready"
    d = driver.stop(JOB_A, "user_terminated")
    assert d.called
    assert reporter.kinds[-1] == "ready"  # never from inside stop()
    clock.advance(0)
    assert reporter.last == ("stopped", ("user_terminated", "mock: stopped"))
    clock.pump([1.0] * 10)
    assert reporter.kinds.count("stopped") == 1 and "exited" not in reporter.kinds


def test_stop_takes_stop_time_and_is_idempotent() -> None:
    driver, reporter, clock = run(MockSettings(run_time=float("inf"), stop_time=2.0), seconds=1)
    driver.stop(JOB_A, "user_terminated")
    driver.stop(JOB_A, "execution_timeout")
    clock.pump([0.5] * 3)
    assert "stopped" not in reporter.kinds
    clock.pump([0.5] * 2)
    assert reporter.last == ("stopped", ("user_terminated", "mock: stopped"))
    driver.stop(JOB_A, "user_terminated")  # no longer running: harmless
    driver.stop(JOB_B, "user_terminated")
    clock.pump([0.5] * 4)
    assert reporter.kinds.count("stopped") == 1


def test_stop_during_initializing() -> None:
    clock = MemoryReactorClock()
    driver = MockDriver(clock, MockSettings(durations=dict.fromkeys(STAGES, 1.0)))
    reporter = Recorder(clock)
    driver.start(job(), reporter)
    clock.pump([0.5] * 4)
    assert reporter.kinds == ["starting", "fetching_image"]
    driver.stop(JOB_A, "user_terminated")
    clock.pump([0.5] * 20)
    assert reporter.kinds == ["starting", "fetching_image", "stopped"]


@pytest.mark.parametrize("where", [*STAGES, "ready"])
def test_crash_at_drops_the_job(where: str) -> None:
    driver, reporter, _ = run(job_start=job(crash_at=where))
    assert reporter.last == ("failed", ("host_dropped_job",
                                        f"mock: the simulated host vanished at {where}"))
    assert "exited" not in reporter.kinds
    assert driver.current is None


def test_console_rate_while_ready() -> None:
    settings = MockSettings(durations=dict.fromkeys(STAGES, 0.0), run_time=float("inf"),
                            console_rate=1000)
    _, reporter, _ = run(settings, seconds=2.0)
    # ~1000 bytes per second of ready, in chunks every 0.1 s.
    assert 1800 <= len(reporter.console_bytes) <= 2000
    assert reporter.console_bytes.startswith(b"mock console 0b8d3c1e line 00000001\n")


def test_console_rate_override_and_silence_before_ready() -> None:
    settings = MockSettings(durations=dict.fromkeys(STAGES, 1.0), run_time=1.0)
    _, reporter, _ = run(settings, seconds=4.9, job_start=job(console_rate=100))
    assert reporter.console_bytes == b""
    _, reporter, _ = run(settings, seconds=10.0, job_start=job(console_rate=100))
    # 5 s of stages, then 1 s of ready at 100 B/s.
    assert 90 <= len(reporter.console_bytes) <= 100


def test_slow_console_rate_emits_whole_bytes() -> None:
    settings = MockSettings(durations=dict.fromkeys(STAGES, 0.0), run_time=float("inf"),
                            console_rate=2)
    _, reporter, _ = run(settings, seconds=10.0, step=0.1)
    assert 18 <= len(reporter.console_bytes) <= 20


@pytest.mark.parametrize("code", ["image_not_found", "image_invalid", "internal_error",
                                  "bad_request"])
def test_refuse_injection(code: str) -> None:
    error = refused(MockSettings(), job(refuse=code))
    assert error.code == code
    assert refused(MockSettings(refuse=code), job()).code == code


@pytest.mark.parametrize("parameter, value", [
    ("exit_status", "three"), ("run_time", "-1"), ("fail_at", "nowhere"),
    ("skip_stages", "starting,bogus"), ("hang", "maybe"), ("console_rate", "inf"),
    ("exit_status", str(2**31)), ("bogus", "1"),
])
def test_bad_mock_parameters_refuse_with_bad_request(parameter: str, value: str) -> None:
    error = refused(MockSettings(), job(**{parameter: value}))
    assert error.code == "bad_request"
    assert f"mock.{parameter}" in error.message


def test_other_parameters_are_ignored() -> None:
    start = job()
    start["parameters"]["mockery"] = {"value": "x", "secret": False}
    _, reporter, _ = run(job_start=start)
    assert reporter.kinds[-1] == "exited"


def test_a_second_job_while_busy_is_refused() -> None:
    clock = MemoryReactorClock()
    driver = MockDriver(clock, MockSettings(run_time=float("inf")))
    driver.start(job(), Recorder(clock))
    failures: list[Any] = []
    driver.start(job(JOB_B), Recorder(clock)).addErrback(failures.append)
    assert failures[0].value.code == "internal_error"
    assert driver.start(job(), Recorder(clock)).called  # the same job: accepted again


def test_cannot_adopt_and_shutdown_silences_the_run() -> None:
    clock = MemoryReactorClock()
    driver = MockDriver(clock)
    reporter = Recorder(clock)
    assert driver.adopt(job(), reporter) is False
    driver.start(job(), reporter)
    clock.pump([0.01] * 3)
    count = len(reporter.reports)
    driver.shutdown()
    clock.pump([0.1] * 50)
    assert len(reporter.reports) == count
    assert not clock.getDelayedCalls()


def test_settings_from_configuration_values() -> None:
    values = {s.key: s.default for s in MOCK_SETTINGS}
    assert MockSettings.from_values(values) == MockSettings()
    values.update({"mock.stages.booting": 2.5, "mock.fail_at": "booting", "mock.hang": True,
                   "mock.skip_stages": ["allocating"]})
    settings = MockSettings.from_values(values)
    assert settings.durations["booting"] == 2.5 and settings.fail_at == "booting"
    assert settings.stages() == ["starting", "fetching_image", "provisioning", "booting"]
    assert MockSettings.from_values(settings.values()) == settings


# -- fetching the image ---------------------------------------------------------------------


def with_stores(start: dict[str, Any]) -> dict[str, Any]:
    start["image"] = {**start["image"], "stores": ["http://store.example:8081"]}
    return start


def fetching_run(settings: MockSettings | None = None, job_start: dict[str, Any] | None = None,
                 fetcher: StubFetcher | None = None
                 ) -> tuple[MockDriver, Recorder, MemoryReactorClock, StubFetcher]:
    clock = MemoryReactorClock()
    fetcher = fetcher or StubFetcher()
    driver = MockDriver(clock, settings or MockSettings(durations=dict.fromkeys(STAGES, 1.0)),
                        fetcher=fetcher)  # type: ignore[arg-type]
    reporter = Recorder(clock)
    driver.start(job_start or with_stores(job()), reporter)
    return driver, reporter, clock, fetcher


def test_fetching_image_really_fetches_when_the_job_has_stores() -> None:
    driver, reporter, clock, fetcher = fetching_run()
    run_for(clock, 1.5, 0.1)
    assert reporter.kinds == ["starting", "fetching_image"]
    assert fetcher.calls == [with_stores(job())["image"]]
    run_for(clock, 5.0, 0.1)  # the stage lasts as long as the fetch
    assert reporter.kinds == ["starting", "fetching_image"]
    fetched = object()
    fetcher.pending[0].callback(fetched)
    clock.advance(0)
    assert reporter.kinds == ["starting", "fetching_image", "allocating"]  # at once: slow fetch
    run_for(clock, 10.0, 0.1)
    assert reporter.kinds == [*STAGES, "ready", "exited"]
    assert fetcher.released == [fetched] and driver.current is None


def test_a_fast_fetch_still_takes_the_stage_duration() -> None:
    _, reporter, clock, fetcher = fetching_run()
    run_for(clock, 1.25, 0.05)
    fetcher.pending[0].callback("image")
    assert reporter.kinds == ["starting", "fetching_image"]
    run_for(clock, 0.8, 0.05)
    assert reporter.kinds[-1] == "allocating"
    assert [t for t, _, _ in reporter.reports] == pytest.approx([0.0, 1.0, 2.0])


def test_a_fetch_error_ends_the_job_with_image_error() -> None:
    from treadmill.supervisor.fetch import ImageFetchError

    driver, reporter, clock, fetcher = fetching_run()
    run_for(clock, 1.5, 0.1)
    fetcher.pending[0].errback(ImageFetchError(
        "image_not_found", "cannot get the manifest of image demo (sha256:ab…): not there"))
    assert reporter.last == ("failed", (
        "image_error", "cannot get the manifest of image demo (sha256:ab…): not there"))
    assert driver.current is None and not clock.getDelayedCalls()


def test_an_unexpected_fetch_failure_is_an_internal_error() -> None:
    _, reporter, clock, fetcher = fetching_run()
    run_for(clock, 1.5, 0.1)
    fetcher.pending[0].errback(RuntimeError("bug"))
    assert reporter.last == ("failed", ("internal_error",
                                        "mock: fetching the image failed: RuntimeError"))


def test_a_stop_during_the_fetch_cancels_it() -> None:
    driver, reporter, clock, fetcher = fetching_run()
    run_for(clock, 1.5, 0.1)
    driver.stop(JOB_A, "user_terminated")
    run_for(clock, 1.0, 0.1)
    assert reporter.kinds == ["starting", "fetching_image", "stopped"]
    assert fetcher.pending[0].called  # cancelled
    run_for(clock, 10.0, 0.1)
    assert reporter.kinds == ["starting", "fetching_image", "stopped"]


def test_a_cache_mount_fetches_even_without_stores() -> None:
    _, _, clock, fetcher = fetching_run(job_start=job(), fetcher=StubFetcher("/mnt/cache"))
    run_for(clock, 1.5, 0.1)
    assert len(fetcher.calls) == 1


@pytest.mark.parametrize("how", ["no stores", "fetch=never", "skipped", "no fetcher"])
def test_the_stage_is_only_simulated_when_it_cannot_or_must_not_fetch(how: str) -> None:
    start = with_stores(job())
    settings = MockSettings(durations=dict.fromkeys(STAGES, 1.0))
    if how == "no stores":
        start = job()
    elif how == "fetch=never":
        start = with_stores(job(fetch="never"))
    elif how == "skipped":
        settings = replace(settings, skip_stages=("fetching_image",))
    clock = MemoryReactorClock()
    fetcher = StubFetcher()
    driver = MockDriver(clock, settings, fetcher=None if how == "no fetcher" else fetcher)
    reporter = Recorder(clock)
    driver.start(start, reporter)
    run_for(clock, 20.0, 0.1)
    assert reporter.kinds[-1] == "exited" and fetcher.calls == []


def test_a_bad_fetch_parameter_is_refused() -> None:
    error = refused(MockSettings(), job(fetch="sometimes"))
    assert error.code == "bad_request" and "mock.fetch" in error.message


def test_the_echo_service_is_offered_while_ready() -> None:
    clock = MemoryReactorClock()
    driver = MockDriver(clock, MockSettings(run_time=1.0))
    reporter = Recorder(clock)
    driver.start(job(), reporter)
    run_for(clock, 0.5, 0.01)
    assert [list(offer) for offer in reporter.offered] == [["echo"]]
    assert len(clock.tcpServers) == 1
    run_for(clock, 2.0, 0.01)
    assert reporter.last[0] == "exited"
    assert clock.tcpServers[0][0] == reporter.offered[0]["echo"][1]


def test_no_echo_service_when_turned_off() -> None:
    _, reporter, clock = run(MockSettings(echo=False))
    assert reporter.offered == [] and clock.tcpServers == []
