"""A QEMU job through the real daemons: switchboard, image store and a supervisor with
the qemu driver, all in-process on loopback; the guest's exit status ends the job."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

pytest.importorskip("treadmill.imagestore.service")

from tests.proxy.support import echo_client
from tests.supervisor.qemu.conftest import BuiltImage, needs_qemu, qemu_processes
from tests.supervisor.qemu.support import (
    VmBed,
    job_reaches,
    push,
    qemu_host,
    restartable_host,
    vm_bed,
)
from tests.support import (
    closed_stream,
    start_switchboard,
    store_service,
    url_of,
)
from tests.util.waiting import eventually
from treadmill.protocol.logs import HOLD_MARKER, hold_resumed_marker
from treadmill.supervisor.service import SupervisorService

pytestmark = needs_qemu


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path) -> AsyncIterator[VmBed]:
    async with vm_bed(migrated_database, tmp_path) as running:
        yield running


@pytest_twisted.ensureDeferred
async def test_a_qemu_job_runs_through_the_switchboard(bed: VmBed, test_image: BuiltImage,
                                                       tmp_path: Path) -> None:
    sb, store_url, work_dir = bed.sb, bed.store_url, bed.work_dir
    await push(sb, store_url, test_image, "demo/tiny-vm")
    r = await sb.admin.post("/api/v1/jobs", {
        "image": "demo/tiny-vm", "tags": ["qemu"],
        "parameters": {"exit_status": {"value": "3"}, "message": {"value": "three"}}})
    assert r.status == 201, r.body
    job_id = r.body["id"]
    final = await job_reaches(sb, job_id, "terminated")
    termination = final["termination"]
    assert termination["reason"] == "workload_exited", final
    assert termination["exit_status"] == 3 and termination["message"] == "three", final
    events = (await sb.admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
    stages = [e.get("stage") for e in events]
    assert "fetching_image" in stages and "booting" in stages
    assert "ready" in [e.get("state") for e in events]
    assert qemu_processes(f"treadmill-{job_id}") == []
    assert os.listdir(work_dir) == []
    # Only the job's disk is left, for snapshots (qemu.kept_dir = STATE_DIR/qemu-kept).
    kept = tmp_path / "vm-1" / "qemu-kept"
    assert sorted(os.listdir(kept)) == [f"{job_id}.json", f"{job_id}.qcow2"]


@pytest_twisted.ensureDeferred
async def test_a_qemu_job_boots_from_a_site_image_cache(migrated_database: str, tmp_path: Path,
                                                        test_image: BuiltImage) -> None:
    """The supervisor reads the layers from the cache's directory (its "mount"), leasing
    the image there; the cache pulls them through from the upstream store on the lease."""
    from treadmill.imagestore.cache import CacheConfig
    from treadmill.imagestore.pullthrough import Credentials

    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2)
    upstream = store_service(sb, tmp_path / "store")
    upstream.startService()
    await upstream.ready()
    store_url = url_of(upstream)
    token_file = tmp_path / "cache-upstream.token"
    token_file.write_text(sb.admin_token)
    cache = store_service(sb, tmp_path / "cache", service="treadmill-imagecache",
                          cache=CacheConfig(upstreams=[store_url], upstream=Credentials(
                                                user="admin", token_file=str(token_file),
                                                realms=[sb.url]),
                                            upstream_retries=1, upstream_backoff=0.05,
                                            upstream_timeout=30.0))
    cache.startService()
    work_dir = tempfile.mkdtemp(prefix="tq-", dir="/tmp")
    supervisor: SupervisorService | None = None
    try:
        await cache.ready()
        await sb.register_store(url_of(cache), "treadmill-imagecache", cache=True)
        await push(sb, store_url, test_image, "demo/cached-vm")
        supervisor = SupervisorService(reactor, await qemu_host(
            sb, "vm-2", tmp_path / "vm-2", work_dir, images_cache_mount=str(tmp_path / "cache"),
            images_cache_url=url_of(cache)))
        supervisor.startService()
        await supervisor.ready()
        await supervisor.connected()
        job_id = (await sb.admin.post("/api/v1/jobs", {
            "image": "demo/cached-vm", "tags": ["qemu"],
            "parameters": {"exit_status": {"value": "0"}}})).body["id"]
        final = await job_reaches(sb, job_id, "terminated")
        assert final["termination"]["reason"] == "workload_exited", final
        assert final["termination"]["exit_status"] == 0, final
        # Every layer came from the cache's directory: nothing was downloaded locally.
        local = tmp_path / "vm-2" / "images" / "blobs"
        downloaded = sorted(p.name for p in local.rglob("*") if p.is_file())
        assert downloaded == [], (downloaded, test_image.info)
        cached = {p.name for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()}
        assert test_image.digest.split(":")[1] in cached
        # The job's disk is kept (for a snapshot), so its image stays leased on the cache.
        assert list(supervisor.fetcher.leases.values()) == [1]
        assert len(list((tmp_path / "cache" / "cache" / "leases").glob("*.json"))) == 1
    finally:
        if supervisor is not None:
            await supervisor.stopService()
        await cache.stopService()
        await upstream.stopService()
        await sb.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_a_corrupt_layer_in_the_store_ends_the_job_with_image_error(
        bed: VmBed, test_image: BuiltImage, tmp_path: Path) -> None:
    sb, store_url, work_dir = bed.sb, bed.store_url, bed.work_dir
    await push(sb, store_url, test_image, "demo/rotten-vm")
    # The store verified the kernel on upload; its file then rots on disk.
    kernel = next(d.digest for name, d in test_image.fetched().image.files()
                  if name == "kernel")
    hexdigest = kernel.split(":")[1]
    blob = tmp_path / "store" / "blobs" / "sha256" / hexdigest[:2] / hexdigest
    size = blob.stat().st_size
    blob.chmod(0o644)
    blob.write_bytes(b"\0" * size)
    r = await sb.admin.post("/api/v1/jobs", {"image": "demo/rotten-vm", "tags": ["qemu"]})
    job_id = r.body["id"]
    final = await job_reaches(sb, job_id, "terminated", timeout=60)
    termination = final["termination"]
    assert termination["reason"] == "image_error", final
    assert kernel in termination["message"], termination
    assert qemu_processes(f"treadmill-{job_id}") == []
    assert os.listdir(work_dir) == []


@pytest_twisted.ensureDeferred
async def test_a_restarted_supervisor_adopts_its_running_vm(migrated_database: str, tmp_path: Path,
                                                            test_image: BuiltImage) -> None:
    """The supervisor stops (gracefully) while its VM runs; the next one re-attaches to the
    same QEMU and the job ends with the guest's own exit status, run once."""
    async with restartable_host(migrated_database, tmp_path, test_image, "demo/long-vm",
                                "vm-3") as (sb, supervisor, work_dir):
        job_id = (await sb.admin.post("/api/v1/jobs", {
            "image": "demo/long-vm", "tags": ["qemu"],
            "parameters": {"sleep": {"value": "8"}, "exit_status": {"value": "5"},
                           "message": {"value": "after the restart"}}})).body["id"]

        await job_reaches(sb, job_id, "ready", timeout=60)
        await supervisor.stop()  # graceful: the VM keeps running
        assert len(qemu_processes(f"treadmill-{job_id}")) == 1
        service = await supervisor.start()
        assert service.runner.status() == {"id": job_id, "state": "ready", "stage": None}
        final = await job_reaches(sb, job_id, "terminated", timeout=60)
        termination = final["termination"]
        assert termination == {"reason": "workload_exited", "exit_status": 5,
                               "message": "after the restart"}, final
        events = (await sb.admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
        assert [e["state"] for e in events].count("ready") == 1

        async def gone() -> bool:
            return qemu_processes(f"treadmill-{job_id}") == []

        await eventually(gone)
        assert os.listdir(work_dir) == []


@pytest_twisted.ensureDeferred
async def test_a_held_vm_outlives_a_supervisor_restart_until_cancelled(
        migrated_database: str, tmp_path: Path, test_image: BuiltImage) -> None:
    """hold_on_failure through the real daemons: the failed job ends held and its VM
    keeps running; a restarted supervisor re-adopts the held VM (journaled hold) and the
    host stays held, its console still going into the job's log (a line typed at it is
    echoed by the guest); the cancel tears the VM down, closes the job's logs (the hold's
    start, resumption and end in ``events``) and the host runs the waiting job."""
    async with restartable_host(migrated_database, tmp_path, test_image, "demo/held-vm",
                                "vm-4") as (sb, supervisor, _work_dir):
        job_id = (await sb.admin.post("/api/v1/jobs", {
            "image": "demo/held-vm", "tags": ["qemu"], "hold_on_failure": 600,
            "parameters": {"exit_status": {"value": "4"},
                           "message": {"value": "look at me"}}})).body["id"]
        final = await job_reaches(sb, job_id, "terminated", timeout=60)
        assert final["termination"] == {"reason": "workload_exited", "exit_status": 4,
                                        "message": "look at me"}, final
        assert final["held_until"] is not None
        [pid] = qemu_processes(f"treadmill-{job_id}")
        waiting = (await sb.admin.post("/api/v1/jobs", {
            "image": "demo/held-vm", "tags": ["qemu"]})).body["id"]

        await supervisor.stop()  # the held VM keeps running
        service = await supervisor.start()
        assert service.runner.held == job_id  # re-adopted from held.json
        await service.connected()
        assert qemu_processes(f"treadmill-{job_id}") == [pid]
        assert (await sb.admin.get(f"/api/v1/jobs/{waiting}")).body["state"] == "queued"
        again = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
        assert again["held_until"] == final["held_until"]
        # Typed at the re-adopted VM's console: the guest's echo goes into the job's log.
        bridge = await eventually(lambda: service.driver.run.bridge, timeout=30)
        client = await echo_client(bridge.port.getHost().port)
        client.transport.write(b"typed during the hold\n")
        await client.wait_for(1, timeout=30)
        client.transport.loseConnection()

        r = await sb.admin.post(f"/api/v1/jobs/{job_id}/terminate")  # tml job cancel
        assert r.status == 200, r.body
        done = await job_reaches(sb, waiting, "terminated", timeout=90)
        assert done["termination"]["exit_status"] == 0, done
        assert qemu_processes(f"treadmill-{job_id}") == []
        released = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
        assert released["held_until"] is None
        assert released["termination"]["exit_status"] == 4  # its end is as it was
        assert service.runner.held is None
        assert not (tmp_path / "vm-4" / "held.json").exists()
        console = await closed_stream(sb.admin, final["logs"][0], job_id, "console")
        _, _, hold = console.partition(HOLD_MARKER)
        assert hold and b"treadmill-test-image: input typed during the hold" in hold
        _, resumed, after = hold.partition(hold_resumed_marker())
        assert resumed and b"typed during the hold" in after  # typed after the restart
        assert console.endswith(b"[treadmill: the hold is over: the hold was released "
                                b"(tml job cancel)]\r\n")
        events = await closed_stream(sb.admin, final["logs"][0], job_id, "events")
        lines = [json.loads(line) for line in events.splitlines()]
        assert [(e.get("hold"), e.get("reason")) for e in lines[-3:]] == [
            ("started", None), ("resumed", None), ("ended", "released")]
