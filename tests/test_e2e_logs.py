"""Job logs end to end: a mock host's console reaches every log server of the job."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from tests.logserver.support import start_logserver
from tests.support import (
    closed_stream,
    final,
    job_reaches,
    mock_host,
    mock_job,
    start_switchboard,
)
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.switchboard.api import Limits

DIGEST = "sha256:" + "7" * 64


@pytest_twisted.ensureDeferred
async def test_console_and_events_reach_every_replica(migrated_database: str,
                                                      tmp_path: Path) -> None:
    key = tmp_path / "capability-key.pem"
    load_or_create_signing_key(str(key))  # The log servers trust its public half.
    servers = [await start_logserver(tmp_path / f"logs-{i}", key) for i in range(2)]
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 limits=Limits(log_servers=tuple(s.url for s in servers),
                                               log_replicas=2))
    supervisor = await mock_host(sb, tmp_path / "sup", run_time=0.5, console_rate=50_000)
    try:
        await supervisor.connected()
        job_id = await mock_job(sb.admin)

        await final(sb.admin, job_id, timeout=20)
        access = (await sb.admin.post(f"/api/v1/jobs/{job_id}/logs/token")).body
        assert sorted(access["servers"]) == sorted(s.url for s in servers)
        headers = {"Authorization": f"Bearer {access['token']}"}

        async def closed_everywhere() -> bool:
            for url in access["servers"]:
                r = await treq.get(f"{url}/v1/jobs/{job_id}/streams", headers=headers)
                streams = {s["name"]: s for s in (await r.json())["streams"]}
                if not all(streams.get(n, {}).get("closed") for n in ("console", "events")):
                    return False
            return True

        await eventually(closed_everywhere, timeout=20)
        copies = {}
        for url in access["servers"]:
            for stream in ("console", "events"):
                r = await treq.get(f"{url}/v1/jobs/{job_id}/streams/{stream}", headers=headers)
                copies.setdefault(stream, []).append(await r.content())
        for stream, bodies in copies.items():
            assert len({hashlib.sha256(b).hexdigest() for b in bodies}) == 1, stream
        assert len(copies["console"][0]) > 10_000
        events = copies["events"][0].decode().splitlines()
        assert '"state":"ready"' in events[-2] and '"state":"terminated"' in events[-1]

        # tml job logs reads the console from a replica.
        out, err = io.StringIO(), io.StringIO()
        code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "logs",
                                   job_id], out, err, {})
        assert code == 0, err.getvalue()
        assert out.getvalue() == copies["console"][0].decode("utf-8", "replace")
        # submit --follow shows the console as it happens, beside the events.
        out, err = io.StringIO(), io.StringIO()
        code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "submit",
                                   DIGEST, "--tag", "mock", "--follow"], out, err, {})
        assert code == 0, err.getvalue()
        assert "mock console" in out.getvalue() and "terminated" in out.getvalue()
        # With one replica down, the other serves.
        await servers[0].service.stopService()
        # A stopped in-process server leaves its keep-alive connections open
        # (a killed one would not): forget them, as a new tml process would.
        from treq.api import get_global_pool

        await get_global_pool().closeCachedConnections()
        out, err = io.StringIO(), io.StringIO()
        code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "logs",
                                   job_id, "--stream", "events"], out, err, {})
        assert code == 0, err.getvalue()
        assert out.getvalue() == copies["events"][0].decode()
    finally:
        await supervisor.stopService()
        await sb.stop()
        for server in servers:
            await server.stop()


@pytest_twisted.ensureDeferred
async def test_log_server_killed_mid_job_loses_no_byte(migrated_database: str,
                                                       tmp_path: Path) -> None:
    import re
    import signal

    from tests.util.daemons import Daemon
    from tests.util.ports import free_port

    key = tmp_path / "capability-key.pem"
    load_or_create_signing_key(str(key))
    port = free_port()
    config = tmp_path / "logserver.toml"
    config.write_text(f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
                      f'root = "{tmp_path / "logs"}"\nfsync = "always"\n'
                      f'[auth]\nkeys_file = "{key}"\n')
    logserver = Daemon("treadmill-logserver", ["--config", str(config)])
    logserver.start()
    url = f"http://127.0.0.1:{port}"
    await logserver.wait_http(f"{url}/healthz")
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 limits=Limits(log_servers=(url,), log_replicas=1))
    supervisor = await mock_host(sb, tmp_path / "sup", run_time=3.0, console_rate=20_000)
    try:
        await supervisor.connected()
        job_id = await mock_job(sb.admin)

        await job_reaches(sb.admin, job_id, "ready", timeout=20)
        # A user follows the console live (tml job logs -f) across the restart.
        followed, follow_err = io.StringIO(), io.StringIO()
        following: Deferred[int] = ensureDeferred(tml(
            reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "logs", job_id,
                      "--follow"], followed, follow_err, {}))
        await deferLater(reactor, 1.0, lambda: None)
        await logserver.signal(signal.SIGKILL)
        await deferLater(reactor, 1.0, lambda: None)  # The console keeps going meanwhile.
        logserver.start()
        await logserver.wait_http(f"{url}/healthz")
        console = (await closed_stream(sb.admin, url, job_id, "console", timeout=30)).decode()
        # The workload may stop mid-line: check the complete lines.
        complete = console[:console.rfind("\n") + 1]
        numbers = [int(n) for n in re.findall(r" line (\d+)\n", complete)]
        assert len(numbers) > 100 and numbers[0] == 1
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), \
            "lost or repeated console lines"
        # The follower waited out the restart and saw every byte once, then ended.
        assert await following.addTimeout(30, reactor) == 0, follow_err.getvalue()
        assert followed.getvalue() == console
    finally:
        await supervisor.stopService()
        await sb.stop()
        await logserver.stop()
