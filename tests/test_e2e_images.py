"""Images end to end: switchboard, image store and a mock supervisor, all real, in-process.

An admin pushes a small Treadmill QEMU image to an image store that trusts the
switchboard's capability keys (``auth.keys_url``) and sends clients to its
registry token endpoint (``auth.realm``), and registers it in the catalogue. A
job naming the catalogue image runs on a mock host whose supervisor really
fetches the image — authenticating to the token endpoint with its host token,
which grants ``pull`` on the repository of the job's image only — and verifies
every digest, then ends ``workload_exited``. A job whose image the store does not
have ends ``image_error`` with a message naming the store and the digest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

pytest.importorskip("treadmill.imagestore.service")

from tests.support import (
    RunningSwitchboard,
    add_host,
    mock_supervisor,
    start_switchboard,
    store_service,
    url_of,
)
from tests.util.waiting import eventually
from treadmill.images import format as fmt
from treadmill.images.oci import RegistryClient
from treadmill.supervisor.blobcache import blob_path
from treadmill.supervisor.service import SupervisorService

BASE = b"QFI\xfb" + bytes(range(256)) * 160  # a tiny fake qcow2 (the magic, then filler)
TOP = b"QFI\xfb" + b"overlay" * 300


@dataclass
class Bed:
    switchboard: RunningSwitchboard
    store_url: str
    images_dir: Path


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path) -> AsyncIterator[Bed]:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 timeout_interval=0.1)
    store = store_service(sb, tmp_path / "store")
    store.startService()
    supervisor: SupervisorService | None = None
    try:
        await store.ready()
        store_url = url_of(store)
        await sb.register_store(store_url, "treadmill-imagestore")
        token = await add_host(sb.admin, "mock-1", ["mock"], anyone_starts=False)
        supervisor = mock_supervisor(sb.url, token, tmp_path / "mock-1", stage_time=0.02,
                                     run_time=0.2)
        await supervisor.ready()
        await supervisor.connected()
        yield Bed(sb, store_url, tmp_path / "mock-1" / "images")
    finally:
        if supervisor is not None:
            await supervisor.stopService()
        await store.stopService()
        await sb.stop()


async def push_image(bed: Bed, name: str) -> tuple[str, dict[str, bytes]]:
    """Push a QEMU image as the admin (the registry token flow with the API token)."""
    client = RegistryClient(reactor, bed.store_url, credentials=("admin", bed.switchboard
                                                                  .admin_token),
                            service="treadmill-imagestore",
                            realm=f"{bed.switchboard.url}/api/v1/registry/token")
    repo = name.lower()
    try:
        await client.push_bytes(repo, fmt.EMPTY_BLOB)
        blobs = [await client.push_bytes(repo, data) for data in (BASE, TOP)]
        manifest = fmt.build_qemu_manifest(blobs)
        digest = await client.put_manifest(repo, "v1", fmt.manifest_bytes(manifest))
    finally:
        await client.close()
    return digest, {fmt.digest_of(BASE): BASE, fmt.digest_of(TOP): TOP}


async def register(bed: Bed, name: str, digest: str) -> None:
    r = await bed.switchboard.admin.post("/api/v1/images", {
        "name": name, "digest": digest, "stores": [bed.store_url]})
    assert r.status == 201, r.body


async def run_job(bed: Bed, image: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    admin = bed.switchboard.admin
    r = await admin.post("/api/v1/jobs", {"image": image, "tags": ["mock"]})
    assert r.status == 201, r.body
    job_id = r.body["id"]

    async def done() -> dict[str, Any] | None:
        body = (await admin.get(f"/api/v1/jobs/{job_id}")).body
        return body if body["state"] == "terminated" else None

    final = await eventually(done, timeout=30)
    events = (await admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
    return final, events


@pytest_twisted.ensureDeferred
async def test_a_job_fetches_its_catalogue_image_and_runs(bed: Bed) -> None:
    digest, layers = await push_image(bed, "Demo/Tiny")
    await register(bed, "Demo/Tiny", digest)
    final, events = await run_job(bed, "Demo/Tiny")
    assert final["termination"]["reason"] == "workload_exited", final
    assert "fetching_image" in [e["stage"] for e in events]
    # Every layer (and the manifest) is in the supervisor's image directory, verified.
    for layer, data in layers.items():
        path = Path(blob_path(str(bed.images_dir), layer))
        assert path.read_bytes() == data
        assert fmt.digest_of(path.read_bytes()) == layer
    assert fmt.digest_of(Path(blob_path(str(bed.images_dir), digest)).read_bytes()) == digest
    # The same image again: nothing to download, the job still runs.
    final, _ = await run_job(bed, "Demo/Tiny")
    assert final["termination"]["reason"] == "workload_exited", final


@pytest_twisted.ensureDeferred
async def test_a_job_enqueued_by_digest_fetches_from_a_catalogue_entry(bed: Bed) -> None:
    """By digest, the job takes the name of a catalogue entry with that digest its owner
    may use (the first by name): the supervisor reads stores by repository, and the host's
    registry token names the repositories of its jobs' images (both failed with a name of
    null: "the job names its image by digest only")."""
    digest, _ = await push_image(bed, "demo/pinned")
    await register(bed, "demo/pinned", digest)
    final, events = await run_job(bed, digest)
    assert final["termination"]["reason"] == "workload_exited", final
    assert final["image"]["name"] == "demo/pinned" and final["image"]["digest"] == digest
    assert "fetching_image" in [e["stage"] for e in events]


@pytest_twisted.ensureDeferred
async def test_an_image_the_store_does_not_have_ends_with_image_error(bed: Bed) -> None:
    await push_image(bed, "demo/ghost")  # the repository exists, but not this digest
    missing = "sha256:" + "1" * 64
    await register(bed, "demo/ghost", missing)
    final, _ = await run_job(bed, "demo/ghost")
    termination = final["termination"]
    assert termination["reason"] == "image_error", final
    message = termination["message"]
    assert missing in message and bed.store_url in message
    assert "not there (MANIFEST_UNKNOWN" in message
    host = (await bed.switchboard.admin.get("/api/v1/hosts/mock-1")).body
    assert host["consecutive_failures"] == 0  # an image error is not the host's fault
