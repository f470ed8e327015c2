"""An extended hold, end to end: a real switchboard, real PostgreSQL, a real log server and
a mock supervisor. A failed job's held host is extended with ``tml job extend`` and stays
held past its first ``held_until``; its console goes on reaching the log server after the
tokens of its start have died (``TOKEN_SLACK`` is 0 here: they live the job's timeout plus
its hold, then the log server's leeway), because the switchboard sends fresh ones with the
hold's new end (``renew_tokens.held_for``, protocol minor 9). And a job extended while its
supervisor was disconnected, which then failed into its hold before the supervisor came
back, gets them from the reconciliation at the reconnect (R4b). With a real proxy too: an
extended held job's services stay reachable through it after the proxy token of its
start has died, its control connection cut and opened again with the fresh token."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.proxy.support import console_echo, start_proxy
from tests.support import (
    closed_stream,
    job_reaches,
    mock_host,
    mock_job,
    run_tml,
    switchboard_with_logs,
)
from tests.switchboard.support import seconds_of, without_sweep
from tests.util.waiting import eventually, sleep
from treadmill.cli import output
from treadmill.common.captoken import CapabilitySigner, load_or_create_signing_key
from treadmill.protocol.logs import HOLD_MARKER
from treadmill.switchboard import jobstart

RATE = 400.0  # console bytes per second: 10 to 11 mock lines
LEEWAY = 5.0  # the log server's and the proxy's, past a token's expiry


def mock_lines(console: bytes) -> list[int]:
    """The numbers of the mock console's lines, the hold's marker lines taken out."""
    text = re.sub(r"\r\n\[treadmill: [^]]*\]\r\n", "", console.decode())
    return [int(n) for n in re.findall(r"mock console \w+ line (\d{8})", text)]


async def _events(sb: Any, log_url: str, job_id: str) -> list[dict[str, Any]]:
    data = await closed_stream(sb.admin, log_url, job_id, "events")
    return [json.loads(line) for line in data.splitlines()]


async def _held(sb: Any, job_id: str) -> dict[str, Any]:
    async def held() -> dict[str, Any] | None:
        body = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
        return body if body["held_until"] is not None else None

    return await eventually(held, timeout=20)  # type: ignore[no-any-return]


async def _over(sb: Any, job_id: str, timeout: float) -> None:
    async def over() -> bool:
        return (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["held_until"] is None

    await eventually(over, timeout=timeout)


def _complete(console: bytes, seconds: float) -> None:
    """The console holds every mock line, in order, for at least ``seconds`` of writing."""
    numbers = mock_lines(console)
    assert numbers == list(range(1, len(numbers) + 1))  # no hole, no repeat
    assert len(numbers) >= seconds * RATE / 40, (len(numbers), seconds)


@pytest_twisted.ensureDeferred
async def test_an_extended_hold_stays_held_and_ships_past_its_first_tokens(
        migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobstart, "TOKEN_SLACK", 0.0)
    timeout, hold, extension = 2.0, 3.0, 9.0
    async with switchboard_with_logs(migrated_database, tmp_path, scheduler_interval=0.2,
                                     timeout_interval=0.1) as (sb, logs):
        await without_sweep(sb)  # the hold ends by its timer alone
        supervisor = await mock_host(sb, tmp_path / "sup", run_time=600.0, console_rate=RATE)
        try:
            await supervisor.connected()
            started = reactor.seconds()
            job_id = await mock_job(sb.admin, timeout=timeout, hold_on_failure=hold)
            body = await _held(sb, job_id)  # timed out, into its hold
            assert body["termination"]["reason"] == "execution_timeout"
            first = seconds_of(body["held_until"])
            code, out = await run_tml(sb.url, sb.admin_token, "job", "extend", job_id[:8],
                                      f"{extension:g}")
            assert code == 0, out
            body = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
            until = body["held_until"]
            assert seconds_of(until) == pytest.approx(first + extension, abs=0.01)
            assert out == f"job {job_id}: terminated; its host mock-1 is held until " \
                          f"{output.fmt_time(until)}\n"
            # tml job show, tml job ls and tml host ls show the new end.
            for argv in (("job", "show", job_id), ("job", "ls", "--state", "terminated"),
                         ("host", "ls")):
                code, out = await run_tml(sb.url, sb.admin_token, *argv)
                assert code == 0 and output.fmt_time(until) in out, (argv, out)
            # The supervisor learnt it: still held past the first end.
            await eventually(lambda: supervisor.runner._held is not None
                             and supervisor.runner._held.until > first + 1, timeout=10)
            await sleep(max(0.0, first + 1.0 - reactor.seconds()))
            assert supervisor.runner.held == job_id
            assert (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["held_until"] == until
            # Until it expires at the new end, well past the first tokens' death.
            await _over(sb, job_id, timeout=extension + 15)
            # On time: the switchboard's timer at held_until (its sweep is stopped).
            assert seconds_of(until) - 0.5 <= reactor.seconds() < seconds_of(until) + 1.0
            assert reactor.seconds() > started + timeout + hold + LEEWAY
            console = await closed_stream(sb.admin, logs.url, job_id, "console")
            assert HOLD_MARKER in console and b"the hold is extended until" in console
            assert console.endswith(b"[treadmill: the hold is over: the hold expired]\r\n")
            _complete(console, timeout + hold + extension - 2.0)
            events = await _events(sb, logs.url, job_id)
            assert [(e.get("hold"), e.get("reason")) for e in events if "hold" in e] == [
                ("started", None), ("extended", None), ("ended", "expired")]
            assert supervisor.runner.held is None and not supervisor.logs.shippers
        finally:
            await supervisor.stopService()


@pytest_twisted.ensureDeferred
async def test_a_job_extended_while_disconnected_that_fails_into_its_hold_is_renewed(
        migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extension's ``renew_tokens`` finds no link; the job fails (its host held) before
    the supervisor is back; the reconnect's reconciliation sees a held job whose timeout
    (and end) the supervisor knows as lower than the database's, and renews."""
    monkeypatch.setattr(jobstart, "TOKEN_SLACK", 0.0)
    timeout, hold, extension, run_time, away = 2.0, 4.0, 20.0, 8.0, 11.0
    async with switchboard_with_logs(migrated_database, tmp_path, scheduler_interval=0.2,
                                     timeout_interval=0.1) as (sb, logs):
        supervisor = await mock_host(sb, tmp_path / "sup", run_time=run_time,
                                     exit_status=3, console_rate=RATE)
        try:
            await supervisor.connected()
            started = reactor.seconds()
            job_id = await mock_job(sb.admin, timeout=timeout, hold_on_failure=hold)
            await job_reaches(sb.admin, job_id, "ready", timeout=20)
            await supervisor.link.stopService()  # the link is down ...
            r = await sb.admin.post(f"/api/v1/jobs/{job_id}/extend", {"by": extension})
            assert r.status == 200, r.body  # ... at the extension ...
            await eventually(lambda: supervisor.runner.held == job_id, timeout=20)
            assert (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["state"] == "ready"
            await sleep(max(0.0, started + away - reactor.seconds()))
            supervisor.link.startService()  # ... and at the failure: back now.
            body = await _held(sb, job_id)
            assert body["termination"]["exit_status"] == 3
            assert body["timeout"] == timeout + extension

            async def renewed() -> bool:
                held = supervisor.runner._held
                return held is not None and held.job["timeout"] == timeout + extension

            await eventually(renewed, timeout=10)
            held = supervisor.runner._held
            assert held is not None
            # The supervisor's hold now ends with the database's (which began at the
            # reconnect, when the final event was stored).
            left = seconds_of(body["held_until"]) - reactor.seconds()
            assert held.until - reactor.seconds() == pytest.approx(left, abs=1.0)
            await _over(sb, job_id, timeout=hold + 15)
            assert reactor.seconds() > started + timeout + hold + LEEWAY + 1.0
            console = await closed_stream(sb.admin, logs.url, job_id, "console")
            assert console.endswith(b"[treadmill: the hold is over: the hold expired]\r\n")
            _complete(console, away + hold - 2.0)
            events = await _events(sb, logs.url, job_id)
            assert [(e.get("hold"), e.get("reason")) for e in events if "hold" in e] == [
                ("started", None), ("extended", None), ("ended", "expired")]
        finally:
            await supervisor.stopService()


@pytest_twisted.ensureDeferred
async def test_an_extended_hold_stays_reachable_through_a_real_proxy(
        migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy checks a publish token when a control connection opens: one opened after
    the first token died (a proxy restart, a network cut) is refused unless the supervisor
    holds the fresh token of the hold's extension (``renew_tokens.held_for``)."""
    monkeypatch.setattr(jobstart, "TOKEN_SLACK", 0.0)
    timeout, hold, extension = 2.0, 3.0, 15.0
    key = tmp_path / "capability-key.pem"  # the switchboard's, which the proxy trusts
    jwks = CapabilitySigner(load_or_create_signing_key(str(key)), "treadmill", reactor).jwks()
    (tmp_path / "keys.json").write_text(json.dumps(jwks))
    proxy = await start_proxy(SimpleNamespace(keys_file=tmp_path / "keys.json"),
                              connect_timeout=2.0)
    try:
        async with switchboard_with_logs(migrated_database, tmp_path, scheduler_interval=0.2,
                                         timeout_interval=0.1,
                                         proxies=(proxy.ws,)) as (sb, _logs):
            supervisor = await mock_host(sb, tmp_path / "sup", run_time=600.0)
            try:
                await supervisor.connected()
                started = reactor.seconds()
                job_id = await mock_job(sb.admin, timeout=timeout, hold_on_failure=hold)
                body = await _held(sb, job_id)
                assert body["termination"]["reason"] == "execution_timeout"
                r = await sb.admin.post(f"/api/v1/jobs/{job_id}/extend", {"by": extension})
                assert r.status == 200, r.body
                until = seconds_of(r.body["held_until"])
                [link] = supervisor.exposure.managers[job_id].links
                first = link.session_token
                await eventually(lambda: supervisor.runner._held is not None
                                 and supervisor.runner._held.until > started + 10, timeout=10)
                console = (await sb.admin.post(f"/api/v1/jobs/{job_id}/console-token")).body
                [endpoint] = console["endpoints"]
                assert endpoint["service"] == "echo", endpoint
                assert await console_echo(endpoint["url"], console["token"], b"held") == b"held"
                # The first publish token is dead (and past the proxy's leeway): cut the
                # control connection; the link opens a new one with the fresh token.
                await sleep(max(0.0, started + timeout + hold + LEEWAY + 1.0
                                - reactor.seconds()))
                assert link.session is not None and link.connections == 1
                link.session.transport.loseConnection()

                async def reachable() -> bool:
                    if link.connections < 2 or link.session is None:
                        return False
                    try:
                        echoed = await console_echo(endpoint["url"], console["token"],
                                                    b"after")
                    except Exception:
                        return False
                    return echoed == b"after"

                await eventually(reachable, timeout=5, interval=0.2)
                assert link.session_token != first
                assert reactor.seconds() < until  # still held
                assert (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body[
                    "endpoints"] == [endpoint]
            finally:
                await supervisor.stopService()
    finally:
        await proxy.stop()
