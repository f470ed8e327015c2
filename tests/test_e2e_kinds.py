"""Scheduling by image kind end to end: a real switchboard, real supervisors (mock
driver declaring kinds) over WebSocket, images registered with ``tml``.

The supervisor reports kinds only on a link of protocol minor 5 or later
(``protocol.KINDS_MINOR``): below that it is an older supervisor, which the
switchboard treats as running any kind; this test checks whichever the current
protocol constants make true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.support import run_tml, start_switchboard
from tests.util.waiting import eventually
from treadmill.dev.fleet import ws_url_for
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.drivers.mock import MockDriver, MockSettings
from treadmill.supervisor.service import SupervisorService

STORE = "http://store.example"
VM = "sha256:" + "1" * 64
FW = "sha256:" + "2" * 64


@pytest_twisted.ensureDeferred
async def test_jobs_go_to_hosts_of_their_kind(migrated_database: str, tmp_path: Path) -> None:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 timeout_interval=0.1)
    supervisors: list[SupervisorService] = []
    try:
        await sb.register_store(STORE, "store")
        for name, kinds in (("vm-1", ("qemu",)), ("board-1", ("board",))):
            r = await sb.admin.post("/api/v1/hosts", {"name": name, "tags": ["mock"]})
            await sb.admin.post(f"/api/v1/hosts/{name}/grants",
                                {"user": "*", "privilege": "start"})
            settings = MockSettings(durations=dict.fromkeys(STAGES, 0.01), run_time=0.05)
            driver = MockDriver(reactor, settings)
            driver.kinds = kinds
            config = SupervisorConfig(url=ws_url_for(sb.url), token=r.body["token"],
                                      state_dir=str(tmp_path / name), reconnect_initial=0.1,
                                      reconnect_max=1.0, durable=False,
                                      driver_values=settings.values())
            service = SupervisorService(reactor, config, driver=driver)
            service.startService()
            supervisors.append(service)
            await service.ready()
            await service.connected()
        for image, digest, kind in (("vm", VM, "qemu"), ("fw", FW, "board")):
            code, out = await run_tml(sb.url, sb.admin_token, "image", "register", image, digest,
                                      "--store", STORE, "--kind", kind, "--host-tag", "mock")
            assert code == 0, out
        reports = protocol.MINOR >= protocol.KINDS_MINOR

        async def hosts_known() -> bool:
            hosts = {h["name"]: h for h in (await sb.admin.get("/api/v1/hosts")).body["hosts"]}
            expected = {"vm-1": ["qemu"], "board-1": ["board"]} if reports else {
                "vm-1": None, "board-1": None}
            return all(hosts[n]["connected"] and hosts[n]["kinds"] == k
                       for n, k in expected.items())
        await eventually(hosts_known)
        jobs: list[tuple[str, str]] = []
        for image in ("vm", "fw") * 4:
            r = await sb.admin.post("/api/v1/jobs", {"image": image})
            assert r.status == 201, r.body
            jobs.append((image, r.body["id"]))

        async def all_done() -> list[dict[str, Any]] | None:
            bodies = [(await sb.admin.get(f"/api/v1/jobs/{j}")).body for _, j in jobs]
            return bodies if all(b["state"] == "terminated" for b in bodies) else None
        bodies = await eventually(all_done, timeout=30)
        assert all(b["termination"]["reason"] == "workload_exited" for b in bodies)
        if reports:
            for (image, _), body in zip(jobs, bodies, strict=True):
                assert body["host"] == {"vm": "vm-1", "fw": "board-1"}[image], body
        code, out = await run_tml(sb.url, sb.admin_token, "host", "ls")
        assert code == 0 and "KINDS" in out
    finally:
        for service in supervisors:
            await service.stopService()
        await sb.stop()
