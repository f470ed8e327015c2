"""Several switchboard instances on one database (fault-tolerance issue 13).

Two real switchboard services in this process share one real PostgreSQL
database; scripted supervisors (:mod:`tests.switchboard.peer`) connect to one
or the other over real WebSockets. A frozen instance is played by a real
connection that holds what a frozen scheduling pass would hold.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred

from tests.support import RunningSwitchboard, start_switchboard, url_of
from tests.switchboard.peer import Peer, Script
from tests.util.waiting import eventually, sleep
from treadmill.common.captoken import CapabilityVerifier, parse_jwks
from treadmill.common.http import ApiError
from treadmill.switchboard.jobstate import Reason, State, Status
from treadmill.switchboard.scheduler import Scheduler
from treadmill.switchboard.service import (
    SigningKeyMismatch,
    SwitchboardConfig,
    SwitchboardService,
)
from treadmill.switchboard.store.scheduler import SCHEDULER_LOCK, SCHEDULING_TIMEOUTS

DIGEST = "sha256:" + "d" * 64
# No timer passes, and no health work (it takes the scheduling lock) within a test.
QUICK = {"scheduler_interval": 60.0, "health_interval": 60.0}


async def start_instance(database: str, first: RunningSwitchboard, name: str,
                         **overrides: Any) -> RunningSwitchboard:
    """Another instance on ``first``'s database, with its signing key."""
    config = SwitchboardConfig(dsn=database, listen=["tcp:0:interface=127.0.0.1"],
                               signing_key=first.service.config.signing_key, instance=name,
                               **{**QUICK, **overrides})
    service = SwitchboardService(reactor, config)
    service.startService()
    await service.ready()
    port = service.ports()[0].getHost().port
    return RunningSwitchboard(service, f"http://127.0.0.1:{port}", first.admin_token)


@pytest_twisted.async_yield_fixture
async def pair(migrated_database: str, tmp_path: Path):
    a = await start_switchboard(migrated_database, tmp_path, instance="a", **QUICK)
    b = await start_instance(migrated_database, a, "b")
    try:
        yield a, b
    finally:
        await b.stop()
        await a.stop()


async def add_host(sb: RunningSwitchboard, name: str, tags: list[str]) -> str:
    r = await sb.admin.post("/api/v1/hosts", {"name": name, "tags": tags})
    assert r.status == 201, r.body
    r2 = await sb.admin.post(f"/api/v1/hosts/{name}/grants", {"user": "*", "privilege": "start"})
    assert r2.status == 201, r2.body
    return r.body["token"]


async def connect(sb: RunningSwitchboard, token: str) -> Peer:
    peer = Peer(sb.url, token, Script())
    await peer.connect()
    await peer.wait_for("status_request")
    return peer


async def submit(sb: RunningSwitchboard, tags: list[str], client: Any = None) -> str:
    r = await (client or sb.admin).post("/api/v1/jobs", {"image": DIGEST, "tags": tags})
    assert r.status == 201, r.body
    return r.body["id"]


async def state_of(sb: RunningSwitchboard, job_id: str) -> str:
    return (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["state"]


async def reaches(sb: RunningSwitchboard, job_id: str, state: str,
                  timeout: float = 10.0) -> None:
    async def check() -> bool:
        return await state_of(sb, job_id) == state

    await eventually(check, timeout=timeout)


async def freeze_heartbeat(sb: RunningSwitchboard) -> None:
    """Make an instance look dead (as after kill -9): no more heartbeats, an old one."""
    await sb.service.instance.getServiceNamed("heartbeat").stopService()
    await sb.store.pool.execute(
        "UPDATE instances SET heartbeat_at = now() - interval '1 minute' WHERE id = %s",
        (sb.service.instance.id,))


# -- liveness and leadership -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_instances_heartbeat_and_the_oldest_leads(pair: Any) -> None:
    a, b = pair
    rows = await a.store.instances()
    assert [(r["name"], r["live"]) for r in rows] == [("a", True), ("b", True)]
    assert a.service.instance.is_leader() and not b.service.instance.is_leader()
    before = rows[1]["heartbeat_at"]
    await sleep(1.2)
    rows = await a.store.instances()
    assert rows[1]["heartbeat_at"] > before  # B keeps beating.
    # Only the leader schedules: wake-ups on B cost nothing.
    token = await add_host(a, "h1", ["t"])
    peer = await connect(b, token)
    job = await submit(b, ["t"])
    await peer.wait_for("start_job", job_id=job)
    assert b.service.scheduler.counts.passes == 0 and b.service.scheduler.counts.lost == 0
    assert b.service.scheduler.counts.ignored > 0 and a.service.scheduler.counts.passes > 0
    # A clean stop marks the instance stopped, and the other takes over.
    await a.stop()
    rows = await b.store.instances()
    assert [(r["name"], r["live"], r["stopped_at"] is not None) for r in rows] == [
        ("a", False, True), ("b", True, False)]
    await eventually(lambda: _true(b.service.instance.is_leader()), timeout=3)
    job2 = await submit(b, ["t"])
    await peer.event(job, "terminated", reason="workload_exited", exit_status=0)
    await peer.wait_for("start_job", job_id=job2)
    peer.disconnect()


async def _true(value: bool) -> bool:
    return value


@pytest_twisted.ensureDeferred
async def test_a_dead_leader_is_replaced(pair: Any) -> None:
    a, b = pair
    await freeze_heartbeat(a)
    await eventually(lambda: _true(b.service.instance.is_leader()), timeout=3)
    token = await add_host(b, "h1", ["t"])
    peer = await connect(b, token)
    job = await submit(b, ["t"])
    await peer.wait_for("start_job", job_id=job)
    peer.disconnect()


@pytest_twisted.ensureDeferred
async def test_hosts_of_a_dead_instance_are_not_scheduled(pair: Any) -> None:
    a, b = pair
    token = await add_host(a, "h1", ["t"])
    peer = await connect(b, token)  # B holds the link, and keeps last_seen_at fresh.
    await freeze_heartbeat(b)
    job = await submit(a, ["t"])
    a.service.scheduler.wake()
    await sleep(0.5)
    assert await state_of(a, job) == "queued"
    assert a.service.scheduler.counts.passes > 0
    host = (await a.admin.get("/api/v1/hosts/h1")).body
    assert (host["instance"], host["connected"]) == ("b", False)
    # The instance comes back: its host is schedulable again.
    b.service.instance.getServiceNamed("heartbeat").startService()
    await peer.wait_for("start_job", job_id=job)
    assert (await a.admin.get("/api/v1/hosts/h1")).body["connected"] is True
    peer.disconnect()


@pytest_twisted.ensureDeferred
async def test_unreachable_through_a_dead_instance_is_not_the_hosts_failure(pair: Any) -> None:
    a, b = pair
    ids = {}
    for name, sb in (("h1", a), ("h2", b)):
        token = await add_host(a, name, [name])
        peer = await connect(sb, token)
        job = await submit(a, [name])
        await peer.wait_for("start_job", job_id=job)
        ids[name] = job
    await freeze_heartbeat(b)
    for job in ids.values():
        await a.store.transition(job, Status(State.TERMINATED, reason=Reason.HOST_UNREACHABLE))
    failures = {name: (await a.admin.get(f"/api/v1/hosts/{name}")).body["consecutive_failures"]
                for name in ids}
    # h1's supervisor was unreachable through a live instance: its fault.
    assert failures == {"h1": 1, "h2": 0}


# -- a frozen scheduling pass ---------------------------------------------------------------


def _frozen_pass(dsn: str, job_id: str, held: threading.Event, release: threading.Event,
                 ended: list[str]) -> None:
    """What a scheduling pass holds when its instance freezes: the scheduling lock
    and a job row, under the scheduling transaction's limits. Runs in a thread."""
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEDULER_LOCK,))
        for name, value in SCHEDULING_TIMEOUTS.items():
            cur.execute("SELECT set_config(%s, %s, true)", (name, str(value)))
        cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        held.set()
        release.wait(30)
        try:
            conn.commit()
            ended.append("committed")
        except psycopg2.Error:
            ended.append("ended by the server")
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_frozen_pass_blocks_nobody_for_more_than_seconds(
        pair: Any, migrated_database: str) -> None:
    a, b = pair
    token = await add_host(a, "h1", ["t"])
    peer = await connect(b, token)
    locked_job = await submit(a, ["none"])  # No host can run it; the frozen pass locked it.
    held, release, ended = threading.Event(), threading.Event(), []
    frozen = threads.deferToThread(_frozen_pass, migrated_database, locked_job, held,
                                   release, ended)
    assert await threads.deferToThread(held.wait, 10)
    started = time.monotonic()
    job = await submit(a, ["t"])
    cancel = await a.admin.post(f"/api/v1/jobs/{locked_job}/terminate")
    cancelled_after = time.monotonic() - started
    assert cancel.status in (200, 202), cancel.body
    await peer.wait_for("start_job", job_id=job)
    assigned_after = time.monotonic() - started
    release.set()
    await frozen
    assert ended == ["ended by the server"]
    assert a.service.scheduler.counts.lost > 0  # It really was held.
    assert cancelled_after < 4.0 and assigned_after < 4.0, (cancelled_after, assigned_after)
    assert await state_of(a, locked_job) == "terminated"
    peer.disconnect()


# -- what the scheduler reads --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_runnable_job_starts_at_once_behind_614_that_no_host_runs(
        switchboard: RunningSwitchboard) -> None:
    sb = switchboard
    token = await add_host(sb, "h1", ["t"])
    peer = await connect(sb, token)
    owner = await sb.store.user_id("admin")
    await sb.store.pool.execute(
        "INSERT INTO jobs (owner_id, image_digest, tags, timeout, queue_timeout, "
        "queue_deadline, event_seq) SELECT %s, %s, ARRAY['gpu'], 60, 3600, "
        "now() + interval '1 hour', 1 FROM generate_series(1, 614)", (owner, DIGEST))
    started = time.monotonic()
    job = await submit(sb, ["t"])
    await peer.wait_for("start_job", job_id=job)
    assert time.monotonic() - started < 1.0
    queued = await sb.store.pool.fetchone("SELECT count(*) AS n FROM jobs WHERE state = "
                                          "'queued'")
    assert queued["n"] == 614
    peer.disconnect()


@pytest_twisted.ensureDeferred
async def test_fairness_holds_among_runnable_jobs(switchboard: RunningSwitchboard) -> None:
    """Alice's many runnable jobs do not crowd out Bob's one, newer, job."""
    sb = switchboard
    alice, bob = await sb.user("alice"), await sb.user("bob")
    peers = []
    for name in ("h1", "h2"):
        peers.append(await connect(sb, await add_host(sb, name, ["t"])))
    first = [await submit(sb, ["t"], alice) for _ in range(2)]
    for job in first:
        await reaches(sb, job, "assigned")
    more = [await submit(sb, ["t"], alice) for _ in range(5)]
    bobs = await submit(sb, ["t"], bob)
    # A host frees: Bob (no share yet) goes before Alice's older jobs.
    peer = next(p for p in peers if p.of_type("start_job")[0]["job"]["id"] == first[0])
    await peer.event(first[0], "terminated", reason="workload_exited", exit_status=0)
    await peer.wait_for("start_job", job_id=bobs)
    assert [await state_of(sb, job) for job in more] == ["queued"] * len(more)
    for p in peers:
        p.disconnect()


def idle(scheduler: Scheduler) -> bool:
    """No pass runs, none is asked for and no retry is due."""
    return scheduler._running is None and not any(
        call is not None and call.active()
        for call in (scheduler._pending_call, scheduler._retry_call))


@pytest_twisted.ensureDeferred
async def test_wake_ups_make_only_useful_passes(pair: Any) -> None:
    a, b = pair
    token = await add_host(a, "h1", ["t"])
    peer = await connect(b, token)
    scheduler, counts = a.service.scheduler, a.service.scheduler.counts
    # The passes the start and the new link cause (late on a loaded machine) end first,
    # and so does the retry of one that lost the lock to the start's health work.
    before = -1
    while before != counts.passes + counts.lost or not idle(scheduler):
        before = counts.passes + counts.lost
        await sleep(0.3)
    for _ in range(5):
        job = await submit(b, ["t"])
        await peer.wait_for("start_job", job_id=job)
        await peer.event(job, "ready")
        await peer.event(job, "terminated", reason="workload_exited", exit_status=0)
        await reaches(a, job, "terminated")
    await sleep(0.3)
    # One pass for the enqueue; none for the freed host (nothing was queued), none
    # for the other job events, none on the other instance.
    assert counts.passes + counts.lost - before <= 6
    assert counts.skipped_wakes >= 5
    assert b.service.scheduler.counts.passes + b.service.scheduler.counts.lost == 0
    # A job waiting for the busy host: freeing the host makes a pass.
    job, waiting = await submit(b, ["t"]), await submit(b, ["t"])
    await peer.wait_for("start_job", job_id=job)
    await peer.event(job, "terminated", reason="workload_exited", exit_status=0)
    await peer.wait_for("start_job", job_id=waiting)
    # Enqueues that arrive together make one pass or a few, not one each.
    before = counts.passes
    await a.store.pool.execute(
        "INSERT INTO jobs (owner_id, image_digest, tags, timeout, queue_timeout, "
        "queue_deadline, event_seq) SELECT 1, %s, ARRAY['none'], 60, 3600, "
        "now() + interval '1 hour', 1 FROM generate_series(1, 50)", (DIGEST,))
    await sleep(0.5)
    assert 1 <= counts.passes - before <= 2
    peer.disconnect()


@pytest_twisted.ensureDeferred
async def test_only_admins_see_which_instance_holds_a_host(pair: Any) -> None:
    a, b = pair
    token = await add_host(a, "h1", ["t"])
    r = await a.admin.post("/api/v1/hosts/h1/grants", {"user": "*", "privilege": "read"})
    assert r.status == 201, r.body
    alice = await a.user("alice")
    assert (await a.admin.get("/api/v1/hosts/h1")).body["instance"] is None
    peer = await connect(b, token)
    for sb in (a, b):
        assert (await sb.admin.get("/api/v1/hosts/h1")).body["instance"] == "b"
        listed = (await sb.admin.get("/api/v1/hosts")).body["hosts"]
        assert [h["instance"] for h in listed] == ["b"]
        for r in (await alice.as_user(alice.token).get("/api/v1/hosts/h1"),):
            assert r.status == 200 and "instance" not in r.body
        listed = (await alice.get("/api/v1/hosts")).body["hosts"]
        assert [h["name"] for h in listed] == ["h1"] and "instance" not in listed[0]
    peer.disconnect()


# -- the shared capability signing key ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_instance_with_another_signing_key_refuses_to_start(
        switchboard: RunningSwitchboard, migrated_database: str, tmp_path: Path) -> None:
    first = switchboard.service.signer.key_id
    other = tmp_path / "other"
    other.mkdir()
    config = SwitchboardConfig(dsn=migrated_database, listen=["tcp:0:interface=127.0.0.1"],
                               signing_key=str(other / "capability-key.pem"), instance="c",
                               **QUICK)
    service = SwitchboardService(reactor, config)
    service.startService()
    try:
        with pytest.raises(SigningKeyMismatch) as refused:
            await service.ready()
    finally:
        await service.stopService()
    message = str(refused.value)
    assert first in message and service.signer.key_id in message
    assert "docs/operations.md" in message
    assert service.ports() == []  # It never listened.
    # A rotation: one instance adopts the new key; then the old one is refused.
    config.adopt_signing_key = True
    service = SwitchboardService(reactor, config)
    service.startService()
    await service.ready()
    await service.stopService()
    row = await switchboard.store.pool.fetchone("SELECT key_id, recorded_by FROM capability_key")
    assert row == {"key_id": service.signer.key_id, "recorded_by": "c"}
    config = SwitchboardConfig(dsn=migrated_database, listen=["tcp:0:interface=127.0.0.1"],
                               signing_key=switchboard.service.config.signing_key, **QUICK)
    service = SwitchboardService(reactor, config)
    service.startService()
    try:
        with pytest.raises(SigningKeyMismatch):
            await service.ready()
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_rotated_key_stays_published_while_listed(migrated_database: str,
                                                          tmp_path: Path) -> None:
    """operations.md's rotation with satellites on ``auth.keys_url``: the instance that
    adopts the new key, its old key file in ``capabilities.published_keys``, publishes
    both, so a token the old key signed still verifies where the JWKS is fetched."""
    old = await start_switchboard(migrated_database, tmp_path, **QUICK)
    old_token = old.service.signer.sign("alice", "treadmill-logserver", [], 3600)
    old_kid = old.service.signer.key_id
    await old.stop()
    new = SwitchboardService(reactor, SwitchboardConfig(
        dsn=migrated_database, listen=["tcp:0:interface=127.0.0.1"],
        signing_key=str(tmp_path / "new-key.pem"), adopt_signing_key=True,
        published_keys=(old.service.config.signing_key,), **QUICK))
    new.startService()
    try:
        await new.ready()
        response = await treq.get(f"{url_of(new)}/.well-known/treadmill/capability-keys")
        jwks = await response.json()
    finally:
        await new.stopService()
    assert [key["kid"] for key in jwks["keys"]] == [new.signer.key_id, old_kid]
    verifier = CapabilityVerifier(parse_jwks(jwks), "treadmill", "treadmill-logserver",
                                  reactor)
    assert verifier.verify_any(old_token).subject == "alice"


@pytest_twisted.ensureDeferred
async def test_cluster_wide_metrics_come_from_the_leader_only(pair: Any) -> None:
    from prometheus_client import generate_latest

    a, b = pair
    await submit(a, ["nothing"])
    for sb in (a, b):
        await sb.service._count_jobs()
    text = {name: generate_latest(sb.service.metrics.registry).decode()
            for name, sb in (("a", a), ("b", b))}
    assert 'treadmill_jobs{state="queued"} 1.0' in text["a"]
    assert "treadmill_jobs{" not in text["b"]
    assert "treadmill_instance_leader 1.0" in text["a"]
    assert "treadmill_instance_leader 0.0" in text["b"]
    assert "treadmill_instances_live 2.0" in text["b"]



def _samples(sb: RunningSwitchboard) -> dict[tuple[str, tuple], float]:
    """The instance's metric samples by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in sb.service.metrics.registry.collect() for s in family.samples}


@pytest_twisted.ensureDeferred
async def test_job_metrics_count_once_in_the_instance_that_applied_the_transition(
        pair: Any) -> None:
    """Assignment on the leader, start and end on the instance holding the link: a sum
    over instances counts each job once; hosts by state come from the leader only."""
    a, b = pair
    token = await add_host(a, "h1", ["t"])
    await add_host(a, "h2", ["t"])
    r = await a.admin.post("/api/v1/hosts/h2/drain", {})
    assert r.status == 200, r.body
    peer = await connect(b, token)
    job = await submit(b, ["t"])
    await peer.wait_for("start_job", job_id=job)
    await peer.event(job, "initializing", stage="starting")
    for sb in (a, b):
        await sb.service._count_jobs()
    busy = _samples(a)
    assert busy[("treadmill_hosts", (("state", "registered"),))] == 2
    assert busy[("treadmill_hosts", (("state", "connected"),))] == 1
    assert busy[("treadmill_hosts", (("state", "enabled"),))] == 1
    assert busy[("treadmill_hosts", (("state", "healthy"),))] == 2
    assert busy[("treadmill_hosts", (("state", "busy"),))] == 1
    assert not any(name == "treadmill_hosts" for name, _ in _samples(b))
    await peer.event(job, "terminated", reason="workload_exited", exit_status=0)
    cancelled = await submit(a, ["nowhere"])
    r = await b.admin.post(f"/api/v1/jobs/{cancelled}/terminate", {})
    assert r.status in (200, 202), r.body
    await reaches(a, cancelled, "terminated")
    sa, sb_ = _samples(a), _samples(b)

    def total(name: str, labels: tuple = ()) -> float:
        return sa.get((name, labels), 0) + sb_.get((name, labels), 0)

    assert total("treadmill_job_queue_wait_seconds_count") == 1
    assert sa[("treadmill_job_queue_wait_seconds_count", ())] == 1  # the leader assigned
    assert total("treadmill_job_dispatch_seconds_count") == 1
    assert sb_[("treadmill_job_dispatch_seconds_count", ())] == 1  # B holds the link
    assert total("treadmill_jobs_terminated_total", (("reason", "workload_exited"),)) == 1
    assert sb_[("treadmill_jobs_terminated_total", (("reason", "workload_exited"),))] == 1
    assert total("treadmill_jobs_terminated_total", (("reason", "user_terminated"),)) == 1
    assert total("treadmill_scheduler_assigned_total") == 1
    # A repeated event changes nothing and counts nothing.
    await peer.event(job, "terminated", reason="workload_exited", exit_status=0)
    assert _samples(b)[("treadmill_jobs_terminated_total",
                        (("reason", "workload_exited"),))] == 1
    peer.disconnect()


# -- revocations ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_token_revoked_on_one_instance_is_refused_by_the_other_at_once(
        pair: Any) -> None:
    a, b = pair
    await a.user("alice")
    for _ in range(10):
        r = await a.admin.post("/api/v1/tokens", {"user": "alice", "label": "t"})
        assert r.status == 201, r.body
        token, token_id = r.body["token"], r.body["id"]
        alice_b = b.admin.as_user(token)
        assert (await alice_b.get("/api/v1/tokens")).status == 200  # Now cached on B.
        revoked = await a.admin.delete(f"/api/v1/tokens/{token_id}")
        assert revoked.status == 200, revoked.body
        assert (await alice_b.get("/api/v1/tokens")).status == 401
    # A lookup that raced with the revocation is not cached past it either.
    r = await a.admin.post("/api/v1/tokens", {"user": "alice", "label": "t"})
    token, token_id = r.body["token"], r.body["id"]
    lookup = Deferred.fromCoroutine(b.service.auth.for_token(token))  # In flight while
    await a.admin.delete(f"/api/v1/tokens/{token_id}")  # the revocation commits.
    await lookup.addErrback(lambda f: f.trap(ApiError))
    await sleep(0.2)
    assert (await b.admin.as_user(token).get("/api/v1/tokens")).status == 401


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_with_one_token_share_reads(switchboard: RunningSwitchboard
                                                             ) -> None:
    auth = switchboard.service.auth
    client = await switchboard.user("alice")
    before = auth.reads
    answers = await gather(*[client.get("/api/v1/tokens") for _ in range(40)])
    assert [r.status for r in answers] == [200] * 40
    assert auth.reads - before < 40
    # A refused token is remembered: no read per attempt.
    bad = client.as_user("tmu_" + "x" * 43)
    before = auth.reads
    for _ in range(5):
        assert (await bad.get("/api/v1/tokens")).status == 401
    assert auth.reads - before == 1


async def gather(*coroutines: Any) -> list[Any]:
    from twisted.internet.defer import gatherResults

    return await gatherResults([Deferred.fromCoroutine(c) for c in coroutines])


# -- rebalancing ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_links_move_to_an_instance_that_joins(pair: Any) -> None:
    a, b = pair
    links = a.service.links
    links._next_rebalance = float("inf")  # As if B had just joined.
    peers = [await connect(a, await add_host(a, f"h{i}", ["t"])) for i in range(6)]
    links._next_rebalance = 0.0
    links.rebalance_quiet = 0.0  # (the test below waits for the quiet time)
    a.service.config.rebalance_interval = 0.3
    # Six links, two live instances: a share is 3, plus 1 of slack. Each link A
    # closes reconnects (as through the balancer) to B.
    moved: list[Peer] = []
    deadline = reactor.seconds() + 5
    while reactor.seconds() < deadline and len(moved) < 2:
        for peer in peers:
            if peer.connection is None and peer not in moved:
                assert peer.close_code == 4005
                moved.append(peer)
                peer.url = b.url
                await peer.connect()
        await sleep(0.05)
    assert len(moved) == 2
    await sleep(1.0)  # Balanced now: nothing more moves (three rebalance intervals).
    assert links.rebalanced == 2 and len(links.by_host) == 4
    assert len(b.service.links.by_host) == 2
    for p in peers:
        p.disconnect()


@pytest_twisted.ensureDeferred
async def test_an_instance_taking_links_sheds_none_until_they_stop_arriving(pair: Any
                                                                            ) -> None:
    """A failover: the survivor takes a dead instance's links while it still counts as
    live, so it is over its share; it must not close them until links stop coming."""
    a, _ = pair
    links = a.service.links
    links.rebalance_quiet = 1.0
    peers = [await connect(a, await add_host(a, f"h{i}", ["t"])) for i in range(6)]
    # Three instances live, six links: a share is 2 (+1 of slack); A holds 6.
    assert links.rebalance(3, 6, 0.1) == 0  # a link came just now
    await sleep(0.6)
    peers.append(await connect(a, await add_host(a, "h6", ["t"])))  # still arriving
    await sleep(0.6)  # 1.2 s since the first links, 0.6 s since the last
    assert links.rebalance(3, 7, 0.1) == 0 and links.rebalanced == 0
    await sleep(0.5)
    closed = links.rebalance(3, 7, 0.1)  # quiet for over a second: the excess goes
    assert closed == 2 and links.rebalanced == 2
    assert len(links.by_host) == 5
    for p in peers:
        p.disconnect()



@pytest_twisted.ensureDeferred
async def test_jobs_for_one_kind_of_host_do_not_hide_jobs_for_another(
        migrated_database: str, tmp_path: Path) -> None:
    sb = await start_switchboard(migrated_database, tmp_path, **QUICK)  # No timer passes.
    try:
        gpu = await connect(sb, await add_host(sb, "gpu-1", ["gpu"]))
        plain = await connect(sb, await add_host(sb, "plain-1", ["t"]))
        for name in ("gpu-1", "plain-1"):
            assert (await sb.admin.post(f"/api/v1/hosts/{name}/drain")).status == 200
        gpu_jobs = [await submit(sb, ["gpu"]) for _ in range(3)]
        plain_job = await submit(sb, ["t"])
        # Both hosts free up in one pass: it must see the plain job too.
        await sb.store.pool.execute("UPDATE hosts SET enabled = true")
        await gpu.wait_for("start_job", job_id=gpu_jobs[0], timeout=1.0)
        await plain.wait_for("start_job", job_id=plain_job, timeout=1.0)
        for peer in (gpu, plain):
            peer.disconnect()
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_a_job_locked_elsewhere_is_retried_soon_not_in_a_loop(
        switchboard: RunningSwitchboard, migrated_database: str) -> None:
    sb = switchboard
    token = await add_host(sb, "h1", ["t"])
    # A transaction (a cancel, say) holds the queued job's row while a pass runs.
    owner = await sb.store.user_id("admin")
    row = await sb.store.pool.fetchone(
        "INSERT INTO jobs (owner_id, image_digest, tags, timeout, queue_timeout, "
        "queue_deadline, event_seq) VALUES (%s, %s, ARRAY['t'], 60, 3600, "
        "now() + interval '1 hour', 1) RETURNING id", (owner, DIGEST))
    job = str(row["id"])
    held, release = threading.Event(), threading.Event()
    holder = threads.deferToThread(_hold_row, migrated_database, job, held, release)
    assert await threads.deferToThread(held.wait, 10)
    passes = sb.service.scheduler.counts.passes
    peer = await connect(sb, token)  # The host is free: a pass picks the locked job.
    await sleep(0.7)
    assert await state_of(sb, job) == "queued"
    release.set()
    await holder
    # A retry every 0.5 s, not a pass after pass while it stays locked (a loop makes
    # hundreds in 0.7 s): the link's notes (its session, its kinds), the retry after
    # 0.5 s and maybe the periodic pass, each at most once or twice.
    assert 1 <= sb.service.scheduler.counts.passes - passes <= 6
    await peer.wait_for("start_job", job_id=job)
    peer.disconnect()


def _hold_row(dsn: str, job_id: str, held: threading.Event, release: threading.Event) -> None:
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        held.set()
        release.wait(30)
        conn.rollback()
    finally:
        conn.close()
