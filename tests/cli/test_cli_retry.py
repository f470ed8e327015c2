"""``tml`` retries: bounded, backing off with jitter, honouring Retry-After, and only
where a repeat is safe. Real HTTP over loopback to the fake switchboard (and a
refusing log server); the backoff arithmetic on a Clock."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.server import Site

from tests.cli.conftest import FakeSwitchboard, Fault, Faulty
from tests.util.ports import free_port
from treadmill.cli import client as client_module
from treadmill.cli.commands import logs as logs_module
from treadmill.cli.retry import Retry, retry_after_seconds

ALICE = "tmt_alice_secret"
JOB = "5b7c0c9e-8a41-4f7e-b1b4-3c2d9e0f1a22"


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Short pauses (the bounds under test stay real)."""
    monkeypatch.setattr(client_module, "RETRY_INITIAL", 0.05)


@pytest.fixture
def env(tmp_path, fake_switchboard):
    return {"HOME": str(tmp_path / "home"), "TREADMILL_URL": fake_switchboard.url,
            "TREADMILL_TOKEN": ALICE, "TREADMILL_RETRY_FOR": "10"}


def no_raw_exceptions(text: str) -> None:
    assert "Traceback" not in text and "Error(" not in text and "<" not in text, text


# -- the backoff, on a clock -------------------------------------------------------------


def test_pauses_double_with_jitter_up_to_the_cap_and_stop_at_the_deadline() -> None:
    clock = Clock()
    retry = Retry(clock, give_up_after=60, initial=0.5, max_delay=8, jitter=lambda: 0.0)
    pauses = []
    while (delay := retry.next_delay()) is not None:
        pauses.append(delay)
        clock.advance(delay)
    # 0.5 * 2**n halved by the (zero) jitter, up to 8 halved; the last cut at the deadline.
    assert pauses[:6] == [0.25, 0.5, 1, 2, 4, 4]
    assert sum(pauses) == pytest.approx(60)
    assert retry.summary() == f"gave up after {len(pauses) + 1} attempts in 60.0 s"
    top = Retry(clock, give_up_after=60, initial=0.5, max_delay=8, jitter=lambda: 0.999)
    assert [round(top.next_delay() or 0, 2) for _ in range(6)] == [0.5, 1, 2, 4, 8, 8]


def test_retry_after_is_honoured_up_to_its_cap_and_the_deadline() -> None:
    clock = Clock()
    retry = Retry(clock, give_up_after=100, retry_after_cap=30, jitter=lambda: 0.0)
    assert retry.next_delay(5.0) == 5.0
    assert retry.next_delay(1000.0) == 30.0
    clock.advance(90)
    assert retry.next_delay(30.0) == pytest.approx(10.0)
    clock.advance(10)
    assert retry.next_delay(0.0) is None


def test_attempts_bound_and_reset() -> None:
    clock = Clock()
    retry = Retry(clock, give_up_after=100, max_attempts=3, jitter=lambda: 0.0)
    assert retry.next_delay() is not None and retry.next_delay() is not None
    assert retry.next_delay() is None
    retry.reset()
    assert retry.next_delay() == 0.25


@pytest.mark.parametrize(("header", "seconds"), [
    (None, 0.0), (b"3", 3.0), ("2.5", 2.5), (b"Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    (b"-1", 0.0), (b"inf", 0.0), (b"nan", 0.0)])
def test_retry_after_header(header: Any, seconds: float) -> None:
    assert retry_after_seconds(header) == seconds


# -- the switchboard's API -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_503_then_200_succeeds(tml, fake_switchboard, env):
    fake_switchboard.faults["GET /api/v1/whoami"] = [Fault(retry_after="0", times=2)]
    result = await tml("whoami", env=env)
    assert result.status == 0, result.err
    assert "alice" in result.out
    assert fake_switchboard.count("GET /api/v1/whoami") == 3
    # One note for the whole episode, not one per attempt.
    assert result.err == ("tml: the switchboard is unavailable (HTTP 503: the database is "
                          "unavailable); retrying for up to 10 s\n")


@pytest_twisted.ensureDeferred
async def test_503_forever_gives_up_within_the_bound(tml, fake_switchboard, env):
    fake_switchboard.faults["GET /api/v1/whoami"] = [Fault(retry_after="1000", times=None)]
    started = reactor.seconds()
    result = await tml("whoami", env={**env, "TREADMILL_RETRY_FOR": "0.8"})
    elapsed = reactor.seconds() - started
    assert result.status == 3
    assert 0.75 < elapsed < 2.0
    last = result.err.splitlines()[-1]
    assert re.fullmatch(
        rf"tml: error: cannot reach the switchboard at {fake_switchboard.url}: the switchboard "
        r"is unavailable \(HTTP 503: the database is unavailable\); gave up after \d+ attempts "
        r"in [01]\.\d s", last), last
    no_raw_exceptions(result.err)
    # Retry-After asked for more than the bound: the deadline wins, no spin either.
    assert 2 <= fake_switchboard.count("GET /api/v1/whoami") <= 3


@pytest_twisted.ensureDeferred
async def test_retry_after_is_honoured(tml, fake_switchboard, env):
    fake_switchboard.faults["GET /api/v1/whoami"] = [Fault(retry_after="1", times=1)]
    result = await tml("whoami", env=env)
    assert result.status == 0, result.err
    first, second = [t for t, what, _ in fake_switchboard.seen if what == "GET /api/v1/whoami"]
    assert second - first >= 0.95


@pytest_twisted.ensureDeferred
async def test_job_submit_is_retried_with_one_idempotency_key(tml, fake_switchboard, env):
    fake_switchboard.faults["POST /api/v1/jobs"] = [Fault(retry_after="0", times=2)]
    result = await tml("job", "submit", "debian", env=env)
    assert result.status == 0, result.err
    (job_id,) = fake_switchboard.jobs
    assert result.out == f"{job_id}\n"
    keys = [key for _, what, key in fake_switchboard.seen if what == "POST /api/v1/jobs"]
    assert len(keys) == 3 and len(set(keys)) == 1
    assert uuid.UUID(keys[0]).version == 4
    # Another submission is another logical request: another key.
    assert (await tml("job", "submit", "debian", env=env)).status == 0
    keys = [key for _, what, key in fake_switchboard.seen if what == "POST /api/v1/jobs"]
    assert len(keys) == 4 and keys[3] != keys[0] and keys[3] is not None


@pytest_twisted.ensureDeferred
async def test_a_post_without_a_key_is_sent_once(tml, fake_switchboard, env):
    fake_switchboard.faults["POST /api/v1/tokens"] = [Fault(times=None)]
    result = await tml("token", "create", env=env)
    assert result.status == 1
    assert result.err == "tml: error: the database is unavailable\n"
    assert fake_switchboard.count("POST /api/v1/tokens") == 1
    assert all(key is None for _, what, key in fake_switchboard.seen
               if what == "POST /api/v1/tokens")


@pytest_twisted.ensureDeferred
async def test_other_errors_are_not_retried(tml, fake_switchboard, env):
    fake_switchboard.faults["GET /api/v1/whoami"] = [Fault(500, "internal", "boom", times=None)]
    result = await tml("whoami", env=env)
    assert result.status == 1 and result.err == "tml: error: boom\n"
    assert fake_switchboard.count("GET /api/v1/whoami") == 1


@pytest_twisted.ensureDeferred
async def test_a_switchboard_that_comes_up_is_reached(tml, tmp_path):
    port = free_port()
    fake = FakeSwitchboard(url=f"http://127.0.0.1:{port}")
    listening: list[Any] = []
    reactor.callLater(0.4, lambda: listening.append(
        reactor.listenTCP(port, Site(Faulty(fake)), interface="127.0.0.1")))
    try:
        result = await tml("whoami", env={"HOME": str(tmp_path), "TREADMILL_URL": fake.url,
                                          "TREADMILL_TOKEN": ALICE,
                                          "TREADMILL_RETRY_FOR": "10"})
    finally:
        for port_ in listening:
            await port_.stopListening()
    assert result.status == 0, result.err
    assert "connection refused; retrying for up to 10 s" in result.err


@pytest_twisted.ensureDeferred
async def test_connection_refused_gives_up_within_the_bound(tml, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    started = reactor.seconds()
    result = await tml("whoami", env={"HOME": str(tmp_path), "TREADMILL_URL": url,
                                      "TREADMILL_TOKEN": ALICE, "TREADMILL_RETRY_FOR": "1"})
    assert reactor.seconds() - started < 2.5
    assert result.status == 3
    assert re.fullmatch(rf"tml: error: cannot reach the switchboard at {url}: connection "
                        r"refused \(gave up after \d+ attempts in 1\.\d s\)",
                        result.err.splitlines()[-1]), result.err


@pytest.mark.parametrize("value", ["soon", "-1", "1e9", "nan"])
@pytest_twisted.ensureDeferred
async def test_a_bad_retry_setting_is_a_clear_error(tml, env, value):
    result = await tml("whoami", env={**env, "TREADMILL_RETRY_FOR": value})
    assert result.status == 1
    assert result.err == (f"tml: error: TREADMILL_RETRY_FOR: expected seconds between 0 and "
                          f"86400, got {value!r}\n")


@pytest_twisted.ensureDeferred
async def test_the_event_watch_outlives_a_503(tml, fake_switchboard, env):
    fake_switchboard.life(reason="workload_exited", exit_status=0)
    fake_switchboard.faults[f"GET /api/v1/jobs/{JOB}/events/watch"] = [
        Fault(retry_after="0", times=2)]
    result = await tml("job", "events", JOB, "--follow", env=env)
    assert result.status == 0, result.err
    assert result.out.splitlines()[-1].split()[1] == "terminated"
    assert fake_switchboard.count(f"GET /api/v1/jobs/{JOB}/events/watch") == 3


# -- log servers ---------------------------------------------------------------------------


class RefusingLogServer:
    """A log server that refuses every token (and counts the attempts)."""

    app = Klein()

    def __init__(self) -> None:
        self.times: list[float] = []

    @app.route("/v1/jobs/<job>/streams/<stream>", methods=["GET"])
    def read(self, request: Any, job: str, stream: str) -> bytes:
        self.times.append(reactor.seconds())
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error": {"code": "unauthenticated", "message": "invalid token"}}'


@pytest_twisted.async_yield_fixture
async def refusing():
    server = RefusingLogServer()
    port = reactor.listenTCP(0, Site(server.app.resource()), interface="127.0.0.1")
    server.url = f"http://127.0.0.1:{port.getHost().port}"
    yield server
    await port.stopListening()


@pytest.fixture
def quick_logs(monkeypatch):
    monkeypatch.setattr(logs_module, "RETRY_INITIAL", 0.05)
    monkeypatch.setattr(logs_module, "GIVE_UP_AFTER", 1.0)


@pytest_twisted.ensureDeferred
async def test_a_refused_log_token_is_no_tight_loop(tml, fake_switchboard, env, refusing,
                                                     quick_logs):
    fake_switchboard.log_servers = [refusing.url]
    result = await tml("job", "logs", JOB, "--follow", env=env)
    assert result.status == 1
    last = result.err.splitlines()[-1]
    assert last == (f"tml: giving up on the logs of job {JOB}: the log server refused the "
                    "read token (invalid token); 5 fresh read tokens in a row were refused")
    # A fresh token before each new try, five tries in all, with growing pauses between.
    assert len(refusing.times) == logs_module.MAX_REFUSALS
    assert len(fake_switchboard.log_tokens) == logs_module.MAX_REFUSALS
    gaps = [b - a for a, b in zip(refusing.times, refusing.times[1:], strict=False)]
    assert all(gap >= 0.05 * 2 ** n * 0.5 for n, gap in enumerate(gaps)), gaps


@pytest_twisted.ensureDeferred
async def test_a_dead_log_server_is_given_up_on_within_the_bound(tml, fake_switchboard, env,
                                                                 quick_logs):
    fake_switchboard.log_servers = [f"http://127.0.0.1:{free_port()}"]
    started = reactor.seconds()
    result = await tml("job", "logs", JOB, "--follow", env=env)
    assert reactor.seconds() - started < 2.5
    assert result.status == 1
    assert re.fullmatch(rf"tml: giving up on the logs of job {JOB}: connection refused; "
                        r"gave up after \d+ attempts in 1\.\d s", result.err.splitlines()[-1])
    no_raw_exceptions(result.err)
    assert len(result.err.splitlines()) < 15  # a handful of tries, not a spin


@pytest_twisted.ensureDeferred
async def test_the_log_token_is_asked_again_while_the_switchboard_is_away(
        tml, fake_switchboard, env, refusing, quick_logs):
    fake_switchboard.log_servers = [refusing.url]
    fake_switchboard.faults[f"POST /api/v1/jobs/{JOB}/logs/token"] = [Fault(times=None)]
    result = await tml("job", "logs", JOB, env=env)
    assert result.status == 3
    assert re.fullmatch(
        rf"tml: error: cannot reach the switchboard at {fake_switchboard.url}: the switchboard "
        r"is unavailable \(HTTP 503: the database is unavailable\); gave up after \d+ "
        r"attempts in 1\.\d s", result.err.strip()), result.err
    assert 3 <= fake_switchboard.count(f"POST /api/v1/jobs/{JOB}/logs/token") < 15


@pytest_twisted.ensureDeferred
async def test_retry_for_from_the_config_file(tml, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "tml.toml"
    config.write_text(f'url = "{url}"\nretry_for = 0\n')
    result = await tml("whoami", env={"HOME": str(tmp_path), "TREADMILL_CONFIG": str(config)})
    assert result.status == 3
    assert result.err == f"tml: error: cannot reach the switchboard at {url}: connection refused\n"
    config.write_text(f'url = "{url}"\nretry_for = "a while"\n')
    result = await tml("whoami", env={"HOME": str(tmp_path), "TREADMILL_CONFIG": str(config)})
    assert result.status == 1
    assert result.err == (f"tml: error: {config}: retry_for: expected seconds between 0 and "
                          "86400, got 'a while'\n")


@pytest_twisted.ensureDeferred
async def test_server_text_in_retry_messages_cannot_drive_the_terminal(tml, fake_switchboard,
                                                                       env):
    fake_switchboard.faults["GET /api/v1/whoami"] = [
        Fault(message="down\x1b[2J\x07", times=None)]
    result = await tml("whoami", env={**env, "TREADMILL_RETRY_FOR": "0.3"})
    assert result.status == 3
    assert "\x1b" not in result.err and "\x07" not in result.err
    assert "down" in result.err
