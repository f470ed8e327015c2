"""Helpers of the QEMU driver tests: a driver started on the test image (``start``,
``settings``, ``job``, ``within``) and, with a real switchboard and image store, a pushed
image (``push``), a qemu host's supervisor configuration (``qemu_host``) and
``job_reaches``; ``vm_host``, an image store and a qemu host's supervisor; ``vm_bed``, the
same beside a switchboard of its own (and a log server); ``restartable_host``, the same
with a supervisor a test restarts (``Restartable``)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from tests.fakes.reporter import Recorder
from tests.supervisor.qemu.conftest import BuiltImage, FakeFetcher
from tests.support import (
    RunningSwitchboard,
    start_switchboard,
    store_service,
    switchboard_with_logs,
    url_of,
)
from tests.support import job_reaches as admin_sees
from tests.util.running import stopping
from treadmill.dev.fleet import ws_url_for
from treadmill.images.oci import RegistryClient
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers.qemu import QemuDriver, QemuSettings
from treadmill.supervisor.service import SupervisorService

BOOT = 60.0  # generous: TCG boots the image in ~3 s, but the machine may be loaded


def settings(work_dir: str, **overrides: Any) -> QemuSettings:
    values: dict[str, Any] = {"accel": "tcg", "memory": 256, "work_dir": work_dir,
                              "shutdown_timeout": 2.0, "quit_timeout": 3.0,
                              "boot_timeout": BOOT}
    values.update(overrides)
    return QemuSettings(**values)


def job(**parameters: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "image": {"digest": "sha256:" + "0" * 64, "name": "demo",
                                               "stores": []},
            "parameters": {k: {"value": str(v)} for k, v in parameters.items()},
            "timeout": 120}


async def within(d: Any, seconds: float = BOOT) -> Any:
    return await d.addTimeout(seconds, reactor)


async def start(test_image: BuiltImage, work_dir: str, job_start: dict[str, Any],
                **overrides: Any) -> tuple[QemuDriver, Recorder, FakeFetcher]:
    fetcher = FakeFetcher(test_image)
    driver = QemuDriver(reactor, settings(work_dir, **overrides), fetcher=fetcher)
    reporter = Recorder()
    await driver.start(job_start, reporter)
    return driver, reporter, fetcher


async def push(sb: RunningSwitchboard, store_url: str, image: BuiltImage, name: str) -> str:
    """Register the store (service treadmill-imagestore) unless it is, push, catalogue."""
    if not any(row["url"] == store_url for row in await sb.store.list_image_stores()):
        await sb.register_store(store_url, "treadmill-imagestore")
    client = RegistryClient(reactor, store_url, credentials=("admin", sb.admin_token),
                            service="treadmill-imagestore",
                            realm=f"{sb.url}/api/v1/registry/token")
    repo = name.lower()
    try:
        await client.push_bytes(repo, b"{}")
        for path in (*image.info["qcow2"], image.info["kernel"], image.info["initrd"]):
            await client.push_file(repo, path)
        digest = await client.put_manifest(repo, "v1", image.manifest)
    finally:
        await client.close()
    assert digest == image.digest
    r = await sb.admin.post("/api/v1/images", {"name": name, "digest": digest,
                                               "stores": [store_url]})
    assert r.status == 201, r.body
    return digest


async def qemu_host(sb: RunningSwitchboard, name: str, state_dir: Path, work_dir: str,
                    **more: Any) -> SupervisorConfig:
    """Register host ``name`` (tag qemu) and the configuration of its supervisor (TCG)."""
    r = await sb.admin.post("/api/v1/hosts", {"name": name, "tags": ["qemu"]})
    assert r.status == 201, r.body
    return SupervisorConfig(
        url=ws_url_for(sb.url), token=r.body["token"], state_dir=str(state_dir),
        reconnect_initial=0.1, reconnect_max=1.0, durable=False, driver="qemu",
        driver_values={"qemu.accel": "tcg", "qemu.memory": 256, "qemu.work_dir": work_dir,
                       "qemu.shutdown_timeout": 2.0}, **more)


async def job_reaches(sb: RunningSwitchboard, job_id: str, state: str,
                      timeout: float = 90) -> dict[str, Any]:
    """The job, once it is in ``state``."""
    return await admin_sees(sb.admin, job_id, state, timeout)


@contextlib.asynccontextmanager
async def store_and_work_dir(sb: RunningSwitchboard, tmp_path: Path
                             ) -> AsyncIterator[tuple[str, str]]:
    """An image store registered with ``sb`` (in ``tmp_path / "store"``) and a work
    directory for the qemu driver: yields the store's URL and the directory; stops the
    store and removes the directory afterwards."""
    store = store_service(sb, tmp_path / "store")
    store.startService()
    work_dir = tempfile.mkdtemp(prefix="tq-", dir="/tmp")
    try:
        await store.ready()
        yield url_of(store), work_dir
    finally:
        await store.stopService()
        shutil.rmtree(work_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def vm_host(sb: RunningSwitchboard, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """:func:`store_and_work_dir` and host ``vm-1``'s supervisor (qemu driver, TCG)
    connected to ``sb``: yields the store's URL and the work directory; stops all."""
    async with store_and_work_dir(sb, tmp_path) as (store_url, work_dir):
        supervisor = SupervisorService(reactor, await qemu_host(sb, "vm-1", tmp_path / "vm-1",
                                                                work_dir))
        supervisor.startService()
        try:
            await supervisor.ready()
            await supervisor.connected()
            yield store_url, work_dir
        finally:
            await supervisor.stopService()


@dataclass
class VmBed:
    """What :func:`vm_bed` started."""

    sb: RunningSwitchboard
    store_url: str
    work_dir: str
    log_url: str | None
    """The log server's URL, if the bed has one."""


@contextlib.asynccontextmanager
async def vm_bed(database: str, tmp_path: Path, *, logs: bool = False) -> AsyncIterator[VmBed]:
    """A switchboard scheduling every 0.2 s (with a log server its jobs ship to, if
    ``logs``) and :func:`vm_host` linked to it; stops all."""
    fast = {"scheduler_interval": 0.2, "timeout_interval": 0.1}
    async with contextlib.AsyncExitStack() as started:
        if logs:
            sb, log_server = await started.enter_async_context(
                switchboard_with_logs(database, tmp_path, **fast))
            log_url: str | None = log_server.url
        else:
            sb = await started.enter_async_context(
                stopping(await start_switchboard(database, tmp_path, **fast)))
            log_url = None
        async with vm_host(sb, tmp_path) as (store_url, work_dir):
            yield VmBed(sb, store_url, work_dir, log_url)


class Restartable:
    """A qemu host's supervisor that a test stops and starts again (its state directory
    and work directory stay): ``service`` is the one running now."""

    def __init__(self, config: SupervisorConfig):
        self.config = config
        self.service: SupervisorService | None = None

    async def start(self) -> SupervisorService:
        self.service = SupervisorService(reactor, self.config)
        self.service.startService()
        await self.service.ready()
        return self.service

    async def stop(self) -> None:
        """Stop the supervisor gracefully (its VM, if any, keeps running)."""
        if self.service is not None and self.service.running:
            await self.service.stopService()


@contextlib.asynccontextmanager
async def restartable_host(database: str, tmp_path: Path, image: BuiltImage, name: str,
                           host: str) -> AsyncIterator[tuple[RunningSwitchboard, Restartable,
                                                             str]]:
    """A switchboard (its jobs' logs on a log server), an image store holding ``image``
    as ``name``, and host ``host``'s supervisor, started: yields the switchboard, the
    supervisor and its work directory; stops all."""
    async with switchboard_with_logs(database, tmp_path, scheduler_interval=0.2) as (sb, _):
        async with store_and_work_dir(sb, tmp_path) as (store_url, work_dir):
            await push(sb, store_url, image, name)
            supervisor = Restartable(await qemu_host(sb, host, tmp_path / host, work_dir))
            try:
                await supervisor.start()
                yield sb, supervisor, work_dir
            finally:
                await supervisor.stop()
