"""A switchboard and one mock supervisor as ``twistd`` processes (``Bed``), which a test
may kill and restart; the ``bed`` fixture starts both and checks that neither logged a
traceback; ``logged_bed`` adds a log server (in-process, trusting the switchboard's key)
and a mock host whose console writes 2000 bytes a second. ``DIGEST`` is the image the
mock host "runs"."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from tests.logserver.support import start_logserver
from tests.support import Client, add_host
from tests.util.daemons import Daemon, bootstrap_admin
from tests.util.ports import free_port
from tests.util.running import stopping
from tests.util.waiting import eventually
from treadmill.common.captoken import load_or_create_signing_key

__all__ = ["DIGEST", "Bed", "bed", "logged_bed"]

DIGEST = "sha256:" + "e" * 64


class Bed:
    """A switchboard and one mock supervisor as twistd processes."""

    def __init__(self, database: str, tmp: Path, *, log_url: str | None = None,
                 mock: str = ""):
        self.tmp = tmp
        self.mock = mock  # more [mock] settings of the supervisor (TOML lines)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sb_config = tmp / "switchboard.toml"
        self.sb_config.write_text(
            f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n'
            f'[database]\ndsn = "{database}"\n'
            f'[capabilities]\nsigning_key = "{tmp / "key.pem"}"\n'
            "[jobs]\ntimeout_interval = 0.2\n"
            "[scheduler]\ninterval = 0.5\n"
            "[supervisors]\nunreachable_after = 20\n"
            + (f'[logs]\nservers = ["{log_url}"]\nreplicas = 1\n' if log_url else ""))
        self.switchboard = Daemon("treadmill-switchboard", ["--config", str(self.sb_config)])
        self.supervisor: Daemon | None = None
        self.admin: Client | None = None

    async def start(self) -> None:
        self.switchboard.start()
        await self.switchboard.wait_http(f"{self.url}/healthz")
        self.admin = Client(self.url, await bootstrap_admin("--config", str(self.sb_config)))
        token = await add_host(self.admin, "mock-1", ["mock"])
        config = self.tmp / "supervisor.toml"
        config.write_text(
            f'state_dir = "{self.tmp / "supervisor"}"\ndriver = "mock"\n'
            f'[switchboard]\nurl = "ws://127.0.0.1:{self.port}"\ntoken = "{token}"\n'
            "[reconnect]\ninitial = 0.1\nmax = 1.0\n"
            f"[mock]\nrun_time = 0.3\n{self.mock}"
            "[mock.stages]\nstarting = 0.05\nfetching_image = 0.05\nallocating = 0.05\n"
            "provisioning = 0.05\nbooting = 0.05\n")
        self.supervisor = Daemon("treadmill-supervisor", ["--config", str(config)])
        self.supervisor.start()

        async def connected() -> bool:
            assert self.admin is not None
            return (await self.admin.get("/api/v1/hosts/mock-1")).body["connected"]

        await eventually(connected, timeout=30)

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.switchboard.stop()


@pytest_twisted.async_yield_fixture
async def bed(database: str, tmp_path: Path):
    async with stopping(Bed(database, tmp_path)) as b:
        await b.start()
        yield b
    for daemon in (b.switchboard, b.supervisor):
        assert daemon is None or "Traceback (most recent" not in daemon.output, daemon.output


@pytest_twisted.async_yield_fixture
async def logged_bed(database: str, tmp_path: Path):
    key = tmp_path / "key.pem"
    load_or_create_signing_key(str(key))
    async with stopping(await start_logserver(tmp_path / "logs", key)) as logs:
        async with stopping(Bed(database, tmp_path, log_url=logs.url,
                                mock="console_rate = 2000\n")) as b:
            await b.start()
            yield b
    for daemon in (b.switchboard, b.supervisor):
        assert daemon is None or "Traceback (most recent" not in daemon.output, daemon.output
