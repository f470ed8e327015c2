"""Kept disks and snapshots of the QEMU driver: the manifest of a snapshot, keeping,
expiring and limiting kept disks (a Clock), and a round trip with real QEMU under TCG
and a real switchboard and image store: job 1 writes a marker to its disk, the
snapshot is pushed, job 2 boots from it and reads the marker."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from tests.fakes.reporter import Recorder
from tests.supervisor.qemu.conftest import BuiltImage, FakeFetcher, needs_qemu
from treadmill.images import format as fmt
from treadmill.supervisor.drivers import IHostSnapshots, SnapshotError
from treadmill.supervisor.drivers.qemu import QemuDriver, QemuSettings
from treadmill.supervisor.drivers.qemu.snapshot import (
    ANN_BASE_DIGEST,
    KeptDisks,
    disk_info,
    snapshot_manifest,
)
from treadmill.supervisor.fetch import FetchedImage

A, B, K, INITRD, N, F = ("sha256:" + c * 64 for c in "abcdef")


def old_manifest() -> bytes:
    manifest = fmt.build_qemu_manifest(
        [fmt.Blob(A, 10), fmt.Blob(B, 20)], kernel=fmt.Blob(K, 5), initrd=fmt.Blob(INITRD, 6),
        cmdline="console=ttyS0 quiet", annotations={"org.example.owner": "lab"})
    return fmt.manifest_bytes(manifest)


def fetched(manifest: bytes) -> FetchedImage:
    image = fmt.parse_image(fmt.load_manifest(manifest))
    return FetchedImage(fmt.digest_of(manifest), "Demo/Tiny", image, manifest,
                        {d.digest: f"/blobs/{d.digest[7:10]}" for _, d in image.files()})


def job_start(digest: str = "sha256:" + "0" * 64, name: str = "Demo/Tiny",
              stores: list[str] | None = None, **parameters: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "image": {"digest": digest, "name": name,
                                               "stores": stores or []},
            "parameters": {k: {"value": str(v)} for k, v in parameters.items()},
            "timeout": 120}


# -- the manifest ---------------------------------------------------------------------------


def test_a_snapshot_is_the_jobs_image_with_the_disk_as_the_new_top() -> None:
    data = old_manifest()
    new = snapshot_manifest(data, fmt.Blob(N, 30))
    fmt.validate_manifest(new, fmt.OCI_MANIFEST, lambda digest: True)
    image = fmt.parse_image(new)
    assert [d.digest for d in image.qcow2] == [A, B, N]
    assert image.top is not None and image.top.size == 30
    assert image.top.annotations == {fmt.ANN_LOWER: B}
    assert image.kernel is not None and image.kernel.digest == K
    assert image.initrd is not None and image.initrd.digest == INITRD
    assert image.cmdline == "console=ttyS0 quiet"
    assert new["annotations"]["org.example.owner"] == "lab"
    assert new["annotations"][ANN_BASE_DIGEST] == fmt.digest_of(data)
    # Listed base first: the new layer right after the old top, before the kernel.
    assert [d["digest"] for d in new["layers"]] == [A, B, N, K, INITRD]
    # A snapshot of the snapshot stacks once more.
    again = fmt.parse_image(snapshot_manifest(fmt.manifest_bytes(new), fmt.Blob(F, 1)))
    assert [d.digest for d in again.qcow2] == [A, B, N, F]


def test_a_snapshot_manifest_refuses_what_is_not_a_qemu_chain() -> None:
    board = fmt.manifest_bytes(fmt.build_board_manifest([fmt.FirmwareFile("fw.bin",
                                                                          fmt.Blob(A, 1))]))
    with pytest.raises(fmt.ManifestError):
        snapshot_manifest(board, fmt.Blob(N, 1))
    with pytest.raises(fmt.ManifestError):  # the same digest twice in the chain
        snapshot_manifest(old_manifest(), fmt.Blob(B, 20))


def test_disk_info_holds_what_a_snapshot_needs() -> None:
    data = old_manifest()
    spec = job_start()
    info = disk_info(spec, fetched(data))
    assert info is not None
    assert info["job"] == spec["id"] and info["digest"] == fmt.digest_of(data)
    assert base64.b64decode(info["manifest"]) == data
    assert info["repository"] == "demo/tiny" and info["top"] == B
    assert set(info["layers"]) == {A, B, K, INITRD}
    assert info["image"] == spec["image"]


def test_the_kept_dir_is_never_inside_the_work_dir() -> None:
    assert QemuSettings(work_dir="/w/q").kept_dir == "/w/q-kept"
    assert QemuSettings.from_values({}, "/st").kept_dir == "/st/qemu-kept"
    for bad in ("/st/qemu", "/st/qemu/kept"):
        with pytest.raises(ValueError, match="kept_dir"):
            QemuSettings.from_values({"qemu.kept_dir": bad}, "/st")
    settings = QemuSettings.from_values({"qemu.keep_disks": 0, "qemu.keep_time": 60}, "/st")
    assert (settings.keep_disks, settings.keep_time) == (0, 60.0)
    with pytest.raises(ValueError):
        QemuSettings.from_values({"qemu.keep_time": 0}, "/st")


# -- keeping, on a Clock ------------------------------------------------------------------


class Bed:
    """KeptDisks on a Clock, file work inline, a fake fetcher that records pins."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.root = root
        self.clock = Clock()
        self.clock.advance(1000)
        self.fetcher = FakeFetcher(None)
        self.settings = QemuSettings(work_dir=str(root / "work"), **settings)
        self.kept = self.make()
        self.manifest = old_manifest()

    def make(self) -> KeptDisks:
        kept = KeptDisks(self.clock, self.settings, self.fetcher,
                         lambda fn, *args: maybeDeferred(fn, *args))
        kept.restore()
        return kept

    def keep(self, job_id: str) -> Any:
        overlay = self.root / f"{job_id}-overlay.qcow2"
        overlay.write_bytes(b"disk of " + job_id.encode())
        info = disk_info({"id": job_id, "image": {"digest": fmt.digest_of(self.manifest),
                                                  "name": "demo"}}, fetched(self.manifest))
        assert info is not None
        d = Deferred.fromCoroutine(self.kept.keep(job_id, str(overlay), info))
        assert d.called
        assert not overlay.exists()  # moved
        return d.result

    def files(self) -> list[str]:
        return sorted(os.listdir(self.settings.kept_dir))


def test_the_last_disk_is_kept_pinned_then_replaced(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    disk = bed.keep("job-1")
    assert bed.files() == ["job-1.json", "job-1.qcow2"]
    assert Path(disk.path).read_bytes() == b"disk of job-1"
    info = json.loads(Path(bed.settings.kept_dir, "job-1.json").read_text())
    assert info["job"] == "job-1" and info["kept_at"] == 1000 and info["top"] == B
    assert sorted(bed.fetcher.pinned) == sorted([fmt.digest_of(bed.manifest), A, B, K, INITRD])
    bed.clock.advance(10)
    bed.keep("job-2")  # keep_disks = 1: job-1's disk goes, and its pins
    assert bed.files() == ["job-2.json", "job-2.qcow2"]
    assert bed.kept.get("job-1") is None and bed.kept.get("job-2") is not None
    assert len(bed.fetcher.pinned) == 5


def test_a_kept_disk_expires_after_keep_time(tmp_path: Path) -> None:
    bed = Bed(tmp_path, keep_time=60.0, keep_disks=3)
    bed.keep("job-1")
    bed.clock.advance(30)
    bed.keep("job-2")
    assert bed.files() == ["job-1.json", "job-1.qcow2", "job-2.json", "job-2.qcow2"]
    bed.clock.advance(30)
    assert bed.files() == ["job-2.json", "job-2.qcow2"]
    assert len(bed.fetcher.pinned) == 5
    bed.clock.advance(30)
    assert bed.files() == [] and bed.fetcher.pinned == [] and bed.clock.getDelayedCalls() == []


def test_keep_disks_zero_keeps_nothing(tmp_path: Path) -> None:
    bed = Bed(tmp_path, keep_disks=0)
    overlay = tmp_path / "o.qcow2"
    overlay.write_bytes(b"x")
    d = Deferred.fromCoroutine(bed.kept.keep("job-1", str(overlay), {}))
    assert d.result is None and not os.path.exists(bed.settings.kept_dir)
    assert bed.fetcher.pinned == []


def test_restarts_keep_fresh_disks_and_remove_stale_ones(tmp_path: Path) -> None:
    bed = Bed(tmp_path, keep_time=100.0, keep_disks=2)
    bed.keep("job-1")
    bed.clock.advance(10)
    bed.keep("job-2")
    bed.kept.close()  # the supervisor stops: files stay, timers stop
    assert bed.clock.getDelayedCalls() == []
    junk = Path(bed.settings.kept_dir)
    (junk / "job-3.qcow2").write_bytes(b"half kept")  # no JSON: a crash while keeping
    (junk / "job-4.json.tmp").write_text("{")
    bed.fetcher.pinned.clear()
    bed.clock.advance(95)  # job-1 is 105 s old, job-2 95 s
    bed.kept = bed.make()
    assert bed.files() == ["job-2.json", "job-2.qcow2"]
    assert len(bed.fetcher.pinned) == 5  # pinned again
    bed.clock.advance(5)
    assert bed.files() == [] and bed.fetcher.pinned == []


def test_restarts_keep_at_most_keep_disks(tmp_path: Path) -> None:
    bed = Bed(tmp_path, keep_disks=3)
    for n in range(3):
        bed.keep(f"job-{n}")
        bed.clock.advance(1)
    bed.kept.close()
    bed.settings = QemuSettings(work_dir=str(tmp_path / "work"), keep_disks=1)
    bed.kept = bed.make()
    assert bed.files() == ["job-2.json", "job-2.qcow2"]


class SlowClient:
    """A registry client whose manifest PUT waits for the test."""

    def __init__(self) -> None:
        self.pushed: list[str] = []
        self.put: Deferred[str] = Deferred()
        self.manifests: list[bytes] = []

    async def push_bytes(self, repo: str, data: bytes) -> fmt.Blob:
        self.pushed.append(fmt.digest_of(data))
        return fmt.Blob(fmt.digest_of(data), len(data))

    async def push_file(self, repo: str, path: str, blob: Any = None) -> Any:
        self.pushed.append(blob.digest)
        return blob, True

    async def put_manifest(self, repo: str, reference: str, data: bytes) -> str:
        self.manifests.append(data)
        await self.put
        return fmt.digest_of(data)

    async def close(self) -> None:
        pass


def test_snapshot_errors_and_joining_an_upload_under_way(tmp_path: Path) -> None:
    fetcher = FakeFetcher(None)
    client = SlowClient()
    fetcher.registry_client = lambda store: client  # type: ignore[attr-defined]
    clock = Clock()
    driver = QemuDriver(clock, QemuSettings(work_dir=str(tmp_path / "work"), keep_time=60.0),
                        fetcher=fetcher)
    assert IHostSnapshots.providedBy(driver)
    unknown = driver.snapshot("nope", "demo/snap", "http://store")
    error = unknown.result.value
    unknown.addErrback(lambda _: None)
    assert isinstance(error, SnapshotError) and error.code == "unknown_job"

    manifest = old_manifest()
    info = disk_info({"id": "job-1", "image": {}}, fetched(manifest))
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"disk")
    Deferred.fromCoroutine(driver.kept.keep("job-1", str(overlay), info or {}))
    disk = driver.kept.get("job-1")
    assert disk is not None
    disk.layer = fmt.Blob(N, 4)  # as if rebased and hashed
    bad = driver.snapshot("job-1", "Demo/Snap", "http://store")
    assert bad.result.value.code == "failed" and "repository" in bad.result.value.message
    bad.addErrback(lambda _: None)

    first = driver.snapshot("job-1", "demo/snap", "http://store")
    second = driver.snapshot("job-1", "demo/snap", "http://store")
    assert not first.called and not second.called and len(client.manifests) == 1
    client.put.callback(None)
    digest = fmt.digest_of(client.manifests[0])
    assert (first.result, second.result) == (digest, digest)
    assert client.pushed == [fmt.EMPTY_DIGEST, A, B, K, INITRD, N]
    assert driver.kept.get("job-1") is disk  # still kept: a second snapshot may follow
    assert disk.busy == 0

    # A disk that expires during an upload is deleted when the upload ends.
    client.put = Deferred()
    third = driver.snapshot("job-1", "demo/other", "http://store")
    clock.advance(61)
    assert driver.kept.get("job-1") is None and os.path.exists(disk.path)
    client.put.callback(None)
    assert fmt.is_digest(third.result)
    assert not os.path.exists(disk.path) and fetcher.pinned == []


def test_a_job_that_cannot_be_adopted_leaves_its_disk_kept(tmp_path: Path) -> None:
    fetcher = FakeFetcher(None)
    settings = QemuSettings(work_dir=str(tmp_path / "work"))
    driver = QemuDriver(Clock(), settings, fetcher=fetcher)
    spec = job_start()
    work = tmp_path / "work" / spec["id"]
    work.mkdir(parents=True)
    (work / "overlay.qcow2").write_bytes(b"disk")
    info = disk_info(spec, fetched(old_manifest()))
    (work / "run.json").write_text(json.dumps({"job": spec["id"], "pid": 2**22 + 1,
                                               "disk": info}))
    assert driver.adopt(spec, Recorder()) is False  # QEMU is gone
    assert not work.exists()
    assert sorted(os.listdir(settings.kept_dir)) == [f"{spec['id']}.json",
                                                     f"{spec['id']}.qcow2"]
    assert driver.kept.get(spec["id"]) is not None and len(fetcher.pinned) == 5


# -- the round trip with real QEMU --------------------------------------------------------


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_a_snapshot_round_trip_through_a_real_store(
        migrated_database: str, tmp_path: Path, test_image: BuiltImage, work_dir: str) -> None:
    pytest.importorskip("treadmill.imagestore.service")
    from tests.supervisor.qemu.support import BOOT, push, settings, within
    from tests.support import start_switchboard, store_service, url_of
    from treadmill.supervisor.fetch import ImageFetcher

    sb = await start_switchboard(migrated_database, tmp_path)
    store = store_service(sb, tmp_path / "store")
    store.startService()
    driver: QemuDriver | None = None
    try:
        await store.ready()
        store_url = url_of(store)
        digest = await push(sb, store_url, test_image, "demo/tiny-vm")
        # Stand-in for a host token that the switchboard grants push to: an admin user
        # named "host" (the fetcher's Basic user name), through the real token flow.
        host = await sb.user("host", admin=True)
        fetcher = ImageFetcher(reactor, cache_mount=None, local_dir=str(tmp_path / "images"),
                               token=host.token, trusted_realms=[sb.url])
        driver = QemuDriver(reactor, settings(work_dir), fetcher=fetcher)

        first = job_start(digest, "demo/tiny-vm", [store_url], write_marker="hello-snapshot")
        reporter = Recorder()
        await driver.start(first, reporter)
        assert (await within(reporter.ended))[0] == "exited", reporter.reports
        assert b"wrote marker hello-snapshot" in reporter.console_bytes

        joined = driver.snapshot(first["id"], "demo/snap", store_url)
        snap = await within(driver.snapshot(first["id"], "demo/snap", store_url))
        assert await joined == snap and fmt.is_digest(snap)
        kept = os.path.join(settings(work_dir).kept_dir, f"{first['id']}.qcow2")
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", kept],
                                         capture_output=True, check=True).stdout)
        assert info["backing-filename"] == "disk-1.qcow2"  # no supervisor path leaks

        second = job_start(snap, "demo/snap", [store_url])
        reporter2 = Recorder()
        await driver.start(second, reporter2)
        assert (await within(reporter2.ended, BOOT)) == ("exited", (0, "test image done"))
        assert (b"treadmill-test-image: disk: treadmill-base-layer | treadmill-top-layer | "
                b"hello-snapshot") in reporter2.console_bytes
        # Job 2's own disk is the kept one now; job 1's went (qemu.keep_disks = 1).
        assert sorted(os.listdir(settings(work_dir).kept_dir)) == [
            f"{second['id']}.json", f"{second['id']}.qcow2"]
        assert os.listdir(work_dir) == []
        unknown = driver.snapshot(first["id"], "demo/snap", store_url)
        with pytest.raises(SnapshotError) as e:
            await unknown
        assert e.value.code == "unknown_job"
    finally:
        if driver is not None:
            await driver.shutdown()
        await store.stopService()
        await sb.stop()
        shutil.rmtree(tmp_path / "store", ignore_errors=True)
