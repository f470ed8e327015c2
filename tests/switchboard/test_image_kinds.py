"""Scheduling by image kind: hosts report the kinds their driver runs (``status.kinds``),
catalogue images record theirs, and a job goes only to a host that runs its kind.

Real switchboard and PostgreSQL; the supervisors are scripted peers
(:mod:`tests.switchboard.peer`) over loopback WebSockets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.support import RunningSwitchboard, start_switchboard
from tests.switchboard.peer import Peer, Script
from tests.switchboard.support import add_host
from tests.util.running import stopping
from tests.util.waiting import eventually
from treadmill.switchboard.links import LinkPolicy
from treadmill.switchboard.scheduling import FreeHost, QueuedJob, assign, may_run

DIGEST_VM = "sha256:" + "a" * 64
DIGEST_FW = "sha256:" + "b" * 64
DIGEST_RAW = "sha256:" + "c" * 64
STORE = "http://store.example"


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path):
    """A switchboard that schedules often, with the image store ``STORE`` registered."""
    async with stopping(await start_switchboard(
            migrated_database, tmp_path, scheduler_interval=0.2,
            unrunnable_grace=0.0)) as running:
        await running.register_store(STORE, "store")
        yield running


async def host_view(sb: RunningSwitchboard, name: str) -> dict[str, Any]:
    r = await sb.admin.get(f"/api/v1/hosts/{name}")
    assert r.status == 200, r.body
    return r.body


async def peer_with(sb: RunningSwitchboard, name: str, kinds: list[str] | None) -> Peer:
    """A connected host whose supervisor reports ``kinds``, once the switchboard has them."""
    peer = Peer(sb.url, await add_host(sb, name), Script(run_started=False, kinds=kinds))
    await peer.connect()
    await peer.wait_for("status_request")

    async def recorded() -> bool:
        view = await host_view(sb, name)
        return view["connected"] and view["kinds"] == (sorted(kinds) if kinds else kinds)
    await eventually(recorded)
    return peer


async def register(sb: RunningSwitchboard, name: str, digest: str, kind: str | None) -> None:
    body: dict[str, Any] = {"name": name, "digest": digest, "stores": [STORE], "host_tags": ["t"]}
    if kind is not None:
        body["kind"] = kind
    r = await sb.admin.post("/api/v1/images", body)
    assert r.status == 201, r.body
    assert r.body["kind"] == kind


async def submit(sb: RunningSwitchboard, image: str) -> dict[str, Any]:
    r = await sb.admin.post("/api/v1/jobs", {"image": image, "tags": ["t"]})
    assert r.status == 201, r.body
    return r.body


async def started_on(sb: RunningSwitchboard, peer: Peer, image: str) -> dict[str, Any]:
    """A job of ``image``, submitted and started on ``peer``'s host."""
    job = await submit(sb, image)
    await peer.wait_for("start_job", job_id=job["id"])
    return job


async def state_of(sb: RunningSwitchboard, job_id: str) -> dict[str, Any]:
    return (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body


@pytest_twisted.ensureDeferred
async def test_a_qemu_image_never_lands_on_a_board_host(sb: RunningSwitchboard) -> None:
    await register(sb, "vm", DIGEST_VM, "qemu")
    await register(sb, "fw", DIGEST_FW, "board")
    board = await peer_with(sb, "board1", ["board"])
    vm_job = await submit(sb, "vm")
    assert vm_job["image"]["kind"] == "qemu"
    # Only a board host is free: the qemu job waits (passes of the scheduler go by).
    passes = sb.service.scheduler.counts.passes
    await eventually(lambda: _true(sb.service.scheduler.counts.passes >= passes + 3))
    assert (await state_of(sb, vm_job["id"]))["state"] == "queued"
    # The board job behind it is not held up by it.
    fw_job = await started_on(sb, board, "fw")
    # A qemu host comes: the qemu job goes there, never to the board host.
    vm_host = await peer_with(sb, "vm1", ["qemu"])
    await vm_host.wait_for("start_job", job_id=vm_job["id"])
    assert [m["job"]["id"] for m in board.of_type("start_job")] == [fw_job["id"]]
    assert (await state_of(sb, vm_job["id"]))["host"] == "vm1"


async def _true(value: bool) -> bool:
    return value


@pytest_twisted.ensureDeferred
async def test_an_old_supervisor_without_kinds_runs_any_kind(sb: RunningSwitchboard) -> None:
    await register(sb, "vm", DIGEST_VM, "qemu")
    await register(sb, "fw", DIGEST_FW, "board")
    old = await peer_with(sb, "old", None)
    assert (await host_view(sb, "old"))["kinds"] is None
    first = await started_on(sb, old, "vm")
    await old.event(first["id"], "terminated", reason="workload_exited", exit_status=0)
    await started_on(sb, old, "fw")


@pytest_twisted.ensureDeferred
async def test_unknown_kind_runs_anywhere(sb: RunningSwitchboard) -> None:
    """A job by a digest the catalogue does not know, or of an image registered without a
    kind, has no kind: any host may run it."""
    await register(sb, "nokind", DIGEST_FW, None)
    board = await peer_with(sb, "board1", ["board"])
    raw = await started_on(sb, board, DIGEST_RAW)
    assert raw["image"]["kind"] is None
    await board.event(raw["id"], "terminated", reason="workload_exited", exit_status=0)
    await started_on(sb, board, "nokind")


@pytest_twisted.ensureDeferred
async def test_a_job_by_digest_takes_the_catalogue_kind(sb: RunningSwitchboard) -> None:
    await register(sb, "vm", DIGEST_VM, "qemu")
    job = await submit(sb, DIGEST_VM)
    assert job["image"]["kind"] == "qemu"


@pytest_twisted.ensureDeferred
async def test_a_kind_no_host_runs_expires_with_a_message(sb: RunningSwitchboard) -> None:
    await register(sb, "vm", DIGEST_VM, "qemu")
    await peer_with(sb, "board1", ["board"])
    job = await submit(sb, "vm")
    await sb.service.scheduler.expire_unrunnable()

    async def ended() -> dict[str, Any] | None:
        body = await state_of(sb, job["id"])
        return body if body["state"] == "terminated" else None
    body = await eventually(ended)
    assert body["termination"]["reason"] == "queue_timeout"
    assert "runs qemu images" in body["termination"]["message"]


@pytest_twisted.ensureDeferred
async def test_kinds_follow_the_supervisor_and_bad_kinds_are_refused(
        sb: RunningSwitchboard) -> None:
    peer = await peer_with(sb, "h", ["qemu"])
    # A reconnect with another driver updates the host's kinds; one without, to any.
    peer.disconnect()
    await peer.closed()
    peer.script.kinds = ["board", "qemu"]
    await peer.connect()
    await eventually(lambda: _kinds_are(sb, "h", ["board", "qemu"]))
    peer.disconnect()
    await peer.closed()
    peer.script.kinds = None
    await peer.connect()
    await eventually(lambda: _kinds_are(sb, "h", None))
    # A malformed kinds list is a protocol violation; the recorded kinds stay.
    peer.script.kinds = ["Not a kind!"]
    peer.disconnect()
    await peer.closed()
    await peer.connect()
    assert await peer.closed() is not None
    assert (await host_view(sb, "h"))["kinds"] is None
    r = await sb.admin.post("/api/v1/images", {"name": "x", "digest": DIGEST_VM,
                                               "stores": [], "kind": "floppy"})
    assert r.status == 400 and "kind" in r.body["error"]["message"]


async def _kinds_are(sb: RunningSwitchboard, name: str, kinds: list[str] | None) -> bool:
    return (await host_view(sb, name))["kinds"] == kinds


def test_may_run_by_kind() -> None:
    def job(kind: str | None) -> QueuedJob:
        return QueuedJob("j", 1, 1, False, frozenset({"t"}), kind)

    def host(kinds: list[str] | None, name: str = "h") -> FreeHost:
        return FreeHost(1, name, 1, frozenset({"t"}), frozenset(),
                        frozenset(kinds) if kinds is not None else None)

    table = [("qemu", ["qemu"], True), ("qemu", ["board"], False), ("qemu", None, True),
             (None, ["board"], True), (None, None, True), ("board", ["board", "qemu"], True),
             ("board", [], False)]
    for kind, kinds, expected in table:
        assert may_run(job(kind), host(kinds)) is expected, (kind, kinds)
    pairs = assign([job("qemu")], [host(["board"], "a"), host(["qemu"], "b")], {})
    assert [h.name for _, h in pairs] == ["b"]


@pytest_twisted.ensureDeferred
async def test_a_snapshot_keeps_its_parents_host_tags_and_kind(sb: RunningSwitchboard) -> None:
    from treadmill.protocol import supervisor as protocol

    r = await sb.admin.post("/api/v1/images", {
        "name": "vm", "digest": DIGEST_VM, "stores": [STORE], "kind": "qemu",
        "host_tags": ["t", "arch=x86_64"]})
    assert r.status == 201, r.body
    r = await sb.admin.post("/api/v1/hosts", {"name": "vm1", "tags": ["t", "arch=x86_64"]})
    peer = Peer(sb.url, r.body["token"], Script(run_started=False, kinds=["qemu"]))
    await peer.connect()
    # The job asks for fewer tags than the image's: the snapshot takes the image's.
    job = (await sb.admin.post("/api/v1/jobs", {"image": "vm", "tags": ["t"]})).body
    await peer.wait_for("start_job", job_id=job["id"])
    await peer.event(job["id"], "terminated", reason="workload_exited", exit_status=0)

    async def ended() -> bool:
        return (await state_of(sb, job["id"]))["state"] == "terminated"
    await eventually(ended)
    r = await sb.admin.post(f"/api/v1/jobs/{job['id']}/snapshots",
                            {"name": "admin/snap", "store": STORE})
    assert r.status == 202, r.body
    await peer.wait_for("snapshot_job")
    ack = await peer.report(protocol.snapshot_result(0, r.body["id"], job["id"],
                                                     digest=DIGEST_FW))
    assert ack["ok"] is True
    image = (await sb.admin.get("/api/v1/images/admin/snap")).body
    assert image["kind"] == "qemu" and image["host_tags"] == ["t", "arch=x86_64"]
    [version] = (await sb.admin.get("/api/v1/images/admin/snap/history")).body["versions"]
    assert version["version"] == 1 and version["digest"] == DIGEST_FW
    assert version["note"] == f"snapshot of job {job['id']}" and version["kind"] == "qemu"
    # And its jobs go only where its parent's would.
    child = await submit(sb, "admin/snap")
    assert child["image"]["kind"] == "qemu"


@pytest_twisted.ensureDeferred
async def test_a_new_link_gets_no_job_before_its_kinds(migrated_database: str,
                                                       tmp_path: Path) -> None:
    """A host whose driver changed (qemu → serial) is not offered a job by the kinds of
    its previous link: no job before the new link's first status is recorded."""
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 links=LinkPolicy(reconcile_retry=0.3))
    try:
        sb.service.links.request_timeout = 0.3
        await sb.register_store(STORE, "store")
        await register(sb, "vm", DIGEST_VM, "qemu")
        peer = await peer_with(sb, "h", ["qemu"])
        peer.disconnect()
        await peer.closed()
        peer.script = Script(run_started=False, kinds=["board"], answer_status=False)
        await peer.connect()
        await peer.wait_for("status_request")
        job = await submit(sb, "vm")
        await peer.wait_for("status_request", count=3)  # retried, unanswered
        passes = sb.service.scheduler.counts.passes
        await eventually(lambda: _true(sb.service.scheduler.counts.passes >= passes + 2))
        assert not peer.of_type("start_job")
        assert (await state_of(sb, job["id"]))["state"] == "queued"
        peer.script.answer_status = True
        await eventually(lambda: _kinds_are(sb, "h", ["board"]))
        passes = sb.service.scheduler.counts.passes
        await eventually(lambda: _true(sb.service.scheduler.counts.passes >= passes + 3))
        assert not peer.of_type("start_job")
        # A supervisor of the old driver again: the job goes.
        peer.script.kinds = ["qemu"]
        peer.disconnect()
        await peer.closed()
        await peer.connect()
        await peer.wait_for("start_job", job_id=job["id"])
    finally:
        await sb.stop()
