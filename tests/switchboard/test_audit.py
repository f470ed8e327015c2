"""The audit log: one record per privileged action, append-only in the database,
retention, and who may read which records (docs/operations.md, "Audit log").

One switchboard for the module, behind a "trusted proxy" (loopback), so that the
source address comes from ``X-Forwarded-For`` where a request sends one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import psycopg2
import pytest
import pytest_twisted
from psycopg2.extensions import make_dsn
from twisted.internet import reactor

from tests.support import Client, RunningSwitchboard, start_switchboard
from treadmill.common.manhole import session_namespace
from treadmill.dev.pgcluster import create_database, drop_database
from treadmill.switchboard import bootstrap, credentials
from treadmill.switchboard.audit import ACTIONS, CONSOLE_ACTIONS, RetentionService
from treadmill.switchboard.auth import PasswordPolicy
from treadmill.switchboard.manhole import helpers

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
PASSWORD = "alice's long password"
SECRET_PARAM = "the-secret-parameter-value-4711"


@dataclass
class World:
    sb: RunningSwitchboard
    alice: Client
    bob: Client
    carol: Client  # holds read on alice's shared job
    private_job: str
    shared_job: str
    state: dict[str, Any]


@pytest_twisted.async_yield_fixture(scope="module")
async def world(pg_admin_dsn, tmp_path_factory):
    name = f"treadmill_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    sb = await start_switchboard(make_dsn(pg_admin_dsn, dbname=name),
                                 tmp_path_factory.mktemp("switchboard"),
                                 passwords=PasswordPolicy(trusted_proxies=("127.0.0.1",)))
    try:
        alice, bob, carol = (await sb.user("alice"), await sb.user("bob"),
                             await sb.user("carol"))
        await sb.store.update_user("alice",
                                   password_hash=credentials.hash_password_sync(PASSWORD))
        await sb.register_store("https://store.example", "store")
        alice_id = await sb.store.user_id("alice")
        await sb.store.create_image("alice/os", DIGEST, ["https://store.example"], alice_id, "")
        jobs = []
        for _ in range(2):
            r = await alice.post("/api/v1/jobs", {
                "image": "alice/os",
                "parameters": {"pw": {"value": SECRET_PARAM, "secret": True}}})
            assert r.status == 201, r.body
            jobs.append(r.body["id"])
        await sb.store.add_grant("job", jobs[1], await sb.store.user_id("carol"), "read")
        yield World(sb, alice, bob, carol, jobs[0], jobs[1], {})
    finally:
        await sb.stop()
        drop_database(pg_admin_dsn, name)


async def rows_after(sb: RunningSwitchboard, after: int) -> list[dict]:
    return await sb.store.pool.fetchall(
        "SELECT * FROM audit_log WHERE id > %s ORDER BY id", (after,))


async def last_id(sb: RunningSwitchboard) -> int:
    row = await sb.store.pool.fetchone("SELECT coalesce(max(id), 0) AS id FROM audit_log")
    return row["id"]


# -- one record per privileged action ------------------------------------------------

Act = Callable[[World], Awaitable[tuple[Any, list[str]]]]


@dataclass
class Case:
    """A privileged request: it returns its response and the secrets it handled."""

    action: str
    actor: str
    subject_kind: str
    subject: str | Callable[[World], str]
    """The subject's id, or how to find it in the world (a job made for the test)."""
    act: Act
    status: int = 200

    def subject_id(self, world: World) -> str:
        return self.subject if isinstance(self.subject, str) else self.subject(world)


async def _login(w: World) -> tuple[Any, list[str]]:
    r = await Client(w.sb.url).post("/api/v1/login", {"user": "alice", "password": PASSWORD},
                                    headers={"x-forwarded-for": "203.0.113.9"})
    return r, [PASSWORD, r.body["token"]]


async def _login_failure(w: World) -> tuple[Any, list[str]]:
    r = await Client(w.sb.url).post("/api/v1/login", {"user": "alice", "password": "wrong pw!"})
    return r, ["wrong pw!"]


async def _token_create(w: World) -> tuple[Any, list[str]]:
    r = await w.sb.admin.post("/api/v1/tokens", {"user": "alice", "label": "ci"})
    w.state["token"] = r.body["id"]
    return r, [r.body["token"]]


async def _token_revoke(w: World) -> tuple[Any, list[str]]:
    return await w.alice.delete(f"/api/v1/tokens/{w.state['token']}"), []


async def _key_add(w: World) -> tuple[Any, list[str]]:
    from tests.util.ssh import new_ssh_public_key

    r = await w.alice.post("/api/v1/keys", {"key": new_ssh_public_key()})
    w.state["key"] = r.body["id"]
    return r, []


async def _key_remove(w: World) -> tuple[Any, list[str]]:
    return await w.alice.delete(f"/api/v1/keys/{w.state['key']}"), []


async def _user_create(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.post("/api/v1/users", {"name": "dave",
                                                   "password": "dave's secret pw"}), \
        ["dave's secret pw"]


async def _user_update(w: World) -> tuple[Any, list[str]]:
    return await w.alice.patch("/api/v1/users/alice", {"password": PASSWORD}), [PASSWORD]


async def _host_create(w: World) -> tuple[Any, list[str]]:
    r = await w.sb.admin.post("/api/v1/hosts", {"name": "rack1", "owner": "alice"})
    return r, [r.body["token"]]


async def _host_tags(w: World) -> tuple[Any, list[str]]:
    return await w.alice.put("/api/v1/hosts/rack1/tags", {"tags": ["x"]}), []


async def _host_drain(w: World) -> tuple[Any, list[str]]:
    return await w.alice.post("/api/v1/hosts/rack1/drain"), []


async def _host_enable(w: World) -> tuple[Any, list[str]]:
    return await w.alice.post("/api/v1/hosts/rack1/enable"), []


async def _check_set(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.put("/api/v1/health-checks/tags/rack", {
        "image": DIGEST, "parameters": {"pw": {"value": SECRET_PARAM, "secret": True}}}), [
        SECRET_PARAM]


async def _check_unset(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.delete("/api/v1/health-checks/tags/rack"), []


async def _host_token(w: World) -> tuple[Any, list[str]]:
    r = await w.sb.admin.post("/api/v1/hosts/rack1/token")
    return r, [r.body["token"]]


async def _host_delete(w: World) -> tuple[Any, list[str]]:
    await w.sb.store.create_host("rack2", [], None, "", credentials.token_hash("rack2"))
    return await w.sb.admin.delete("/api/v1/hosts/rack2"), []


async def _store_add(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.post("/api/v1/stores", {"url": "https://s2.example",
                                                    "service": "s2"}), []


async def _store_remove(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.delete("/api/v1/stores/s2"), []


async def _image_create(w: World) -> tuple[Any, list[str]]:
    return await w.alice.post("/api/v1/images", {"name": "alice/fw", "digest": DIGEST,
                                                 "stores": ["https://store.example"]}), []


async def _image_update(w: World) -> tuple[Any, list[str]]:
    return await w.alice.put("/api/v1/images/alice/fw", {"digest": OTHER_DIGEST}), []


async def _image_rollback(w: World) -> tuple[Any, list[str]]:
    return await w.alice.post("/api/v1/images/alice/fw/rollback", {"version": 1}), []


async def _image_grant(w: World) -> tuple[Any, list[str]]:
    return await w.alice.post("/api/v1/images/alice/fw/grants",
                              {"user": "bob", "privilege": "use"}), []


async def _image_revoke(w: World) -> tuple[Any, list[str]]:
    return await w.alice.delete("/api/v1/images/alice/fw/grants/bob/use"), []


async def _image_delete(w: World) -> tuple[Any, list[str]]:
    return await w.alice.delete("/api/v1/images/alice/fw"), []


async def _job_grant(w: World) -> tuple[Any, list[str]]:
    return await w.alice.post(f"/api/v1/jobs/{w.shared_job}/grants",
                              {"user": "bob", "privilege": "stop"}), []


async def _job_revoke(w: World) -> tuple[Any, list[str]]:
    return await w.alice.delete(f"/api/v1/jobs/{w.shared_job}/grants/bob/stop"), []


async def _namespace_grant(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.post("/api/v1/namespaces/team/grants",
                                 {"user": "bob", "privilege": "use"}), []


async def _namespace_revoke(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.delete("/api/v1/namespaces/team/grants/bob/use"), []


async def _console_token(w: World) -> tuple[Any, list[str]]:
    r = await w.carol.post(f"/api/v1/jobs/{w.shared_job}/console-token", {"access": "read"})
    return r, [r.body["token"], SECRET_PARAM]


async def _push_token(w: World) -> tuple[Any, list[str]]:
    r = await w.alice.get("/api/v1/registry/token?service=store"
                          "&scope=repository:alice/fw:pull,push")
    return r, [r.body["token"]]


async def _job_extend(w: World) -> tuple[Any, list[str]]:
    # Someone else's job: an admin moves alice's deadline.
    return await w.sb.admin.post(f"/api/v1/jobs/{w.shared_job}/extend", {"by": 600}), \
        [SECRET_PARAM]


async def _job_cancel(w: World) -> tuple[Any, list[str]]:
    return await w.sb.admin.post(f"/api/v1/jobs/{w.private_job}/terminate"), [SECRET_PARAM]


async def _job_snapshot(w: World) -> tuple[Any, list[str]]:
    # The private job ended (job.cancel above); pretend it ran on a host.
    await w.sb.store.create_host("rack4", [], None, "", credentials.token_hash("rack4"))
    await w.sb.store.pool.execute(
        "UPDATE jobs SET host_id = (SELECT id FROM hosts WHERE name = 'rack4') WHERE id = %s",
        (w.private_job,))
    return await w.alice.post(f"/api/v1/jobs/{w.private_job}/snapshots",
                              {"name": "alice/snap", "store": "https://store.example"}), \
        [SECRET_PARAM]


CASES = [
    Case("login", "alice", "user", "alice", _login, 201),
    Case("login.failure", "alice", "user", "alice", _login_failure, 401),
    Case("token.create", "admin", "user", "alice", _token_create, 201),
    Case("token.revoke", "alice", "user", "alice", _token_revoke),
    Case("key.add", "alice", "user", "alice", _key_add, 201),
    Case("key.remove", "alice", "user", "alice", _key_remove),
    Case("user.create", "admin", "user", "dave", _user_create, 201),
    Case("user.update", "alice", "user", "alice", _user_update),
    Case("host.create", "admin", "host", "rack1", _host_create, 201),
    Case("host.tags", "alice", "host", "rack1", _host_tags),
    Case("host.drain", "alice", "host", "rack1", _host_drain),
    Case("host.enable", "alice", "host", "rack1", _host_enable),
    Case("host.token", "admin", "host", "rack1", _host_token),
    Case("host.health_check.set", "admin", "host", "tag:rack", _check_set),
    Case("host.health_check.unset", "admin", "host", "tag:rack", _check_unset, 204),
    Case("host.delete", "admin", "host", "rack2", _host_delete, 204),
    Case("store.add", "admin", "store", "s2", _store_add, 201),
    Case("store.remove", "admin", "store", "s2", _store_remove, 204),
    Case("store.push_token", "alice", "store", "store", _push_token),
    Case("image.create", "alice", "image", "alice/fw", _image_create, 201),
    Case("image.update", "alice", "image", "alice/fw", _image_update),
    Case("image.rollback", "alice", "image", "alice/fw", _image_rollback),
    Case("grant.add", "alice", "image", "alice/fw", _image_grant, 201),
    Case("grant.remove", "alice", "image", "alice/fw", _image_revoke, 204),
    Case("image.delete", "alice", "image", "alice/fw", _image_delete, 204),
    Case("grant.add", "alice", "job", lambda w: w.shared_job, _job_grant, 201),
    Case("grant.remove", "alice", "job", lambda w: w.shared_job, _job_revoke, 204),
    Case("namespace.grant", "admin", "namespace", "team", _namespace_grant, 201),
    Case("namespace.revoke", "admin", "namespace", "team", _namespace_revoke, 204),
    Case("job.console_token", "carol", "job", lambda w: w.shared_job, _console_token),
    Case("job.extend", "admin", "job", lambda w: w.shared_job, _job_extend),
    Case("job.cancel", "admin", "job", lambda w: w.private_job, _job_cancel),
    Case("job.snapshot", "alice", "job", lambda w: w.private_job, _job_snapshot, 202),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.action}-{c.subject_kind}" for c in CASES])
@pytest_twisted.ensureDeferred
async def test_each_privileged_action_makes_one_record(world: World, case: Case) -> None:
    before = await last_id(world.sb)
    response, secrets = await case.act(world)
    assert response.status == case.status, response.body
    rows = await rows_after(world.sb, before)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["action"], row["actor"], row["actor_kind"], row["subject_kind"],
            row["subject_id"]) == (case.action, case.actor, "user", case.subject_kind,
                                   case.subject_id(world))
    assert row["source"] == ("203.0.113.9" if case.action == "login" else "127.0.0.1")
    text = json.dumps(row, default=str)
    for secret in secrets:
        assert secret not in text
    assert not any(str(v).startswith(("tmu_", "tmh_")) for v in row["details"].values())
    if case.action == "job.console_token":
        claims = jwt.decode(response.body["token"], options={"verify_signature": False})
        assert row["details"] == {"access": "read", "expires_in": 300,
                                  "token_jti": claims["jti"]}
    if case.action == "store.push_token":
        claims = jwt.decode(response.body["token"], options={"verify_signature": False})
        assert row["subject_user"] == "alice"
        assert row["details"] == {"repositories": {"alice/fw": ["pull", "push"]},
                                  "expires_in": 300, "token_jti": claims["jti"]}
    if case.action == "job.extend":
        assert row["subject_user"] == "alice"
        assert row["details"]["by"] == 600


def test_every_action_is_tested() -> None:
    # host.health is the switchboard's own (tests/switchboard/test_host_health.py).
    # Console connections come from supervisors: test_console_audit.py.
    assert ACTIONS - {"host.health"} - set(CONSOLE_ACTIONS.values()) == {
        case.action for case in CASES}


@pytest_twisted.ensureDeferred
async def test_a_hosts_snapshot_push_token_is_recorded_as_the_host(world: World) -> None:
    """rack4 holds a pending snapshot (job.snapshot above): its push token is the host's."""
    token = credentials.new_token(credentials.HOST_TOKEN_PREFIX)
    await world.sb.store.pool.execute("UPDATE hosts SET token_hash = %s WHERE name = 'rack4'",
                                      (credentials.token_hash(token),))
    (repository,) = await world.sb.store.pool.fetchall(
        "SELECT repository FROM snapshots WHERE state = 'pending'")
    before = await last_id(world.sb)
    r = await Client(world.sb.url, token).get(
        f"/api/v1/registry/token?service=store&scope=repository:"
        f"{repository['repository']}:pull,push")
    assert r.status == 200, r.body
    (row,) = await rows_after(world.sb, before)
    assert (row["actor"], row["actor_kind"], row["action"], row["subject_id"],
            row["subject_user"]) == ("host:rack4", "host", "store.push_token", "store", None)
    assert row["details"]["repositories"] == {repository["repository"]: ["pull", "push"]}
    assert token not in json.dumps(row, default=str)


@pytest_twisted.ensureDeferred
async def test_pull_tokens_leave_no_record(world: World) -> None:
    """Only registry tokens that may change a store are recorded: pulls are every job's."""
    before = await last_id(world.sb)
    r = await world.alice.get("/api/v1/registry/token?service=store"
                              "&scope=repository:alice/os:pull")
    assert r.status == 200 and r.body["token"]
    # Asked for push where alice may only pull: the token grants pull, no record.
    r = await world.bob.get("/api/v1/registry/token?service=store"
                            "&scope=repository:alice/os:pull,push")
    assert r.status == 200
    assert await rows_after(world.sb, before) == []


@pytest_twisted.ensureDeferred
async def test_refused_requests_leave_no_record(world: World) -> None:
    before = await last_id(world.sb)
    assert (await world.bob.post(f"/api/v1/jobs/{world.private_job}/terminate")).status == 404
    assert (await world.bob.post("/api/v1/hosts", {"name": "nope"})).status == 403
    assert (await world.bob.patch("/api/v1/users/alice", {"admin": True})).status == 403
    assert await rows_after(world.sb, before) == []


@pytest_twisted.ensureDeferred
async def test_manhole_helpers_record_as_manhole(world: World) -> None:
    sb = world.sb
    await sb.admin.post("/api/v1/hosts", {"name": "rack3"})
    r = await sb.admin.post("/api/v1/tokens", {"user": "bob"})
    before = await last_id(sb)
    found = session_namespace(helpers(sb.service), "ops SHA256:abc")
    await found["drain"]("rack3")
    await found["revoke_token"](r.body["id"])
    rows = await rows_after(sb, before)
    assert [(row["actor"], row["actor_kind"], row["action"], row["subject_id"], row["source"],
             row["details"]["operator"]) for row in rows] == [
        ("manhole", "manhole", "host.drain", "rack3", "", "ops SHA256:abc"),
        ("manhole", "manhole", "token.revoke", "bob", "", "ops SHA256:abc")]


@pytest_twisted.ensureDeferred
async def test_bootstrap_records_its_changes(migrated_database: str) -> None:
    """``python -m treadmill.switchboard.bootstrap`` makes or re-enables an admin and
    issues a token outside the API: recorded by actor ``bootstrap`` (kind ``system``),
    with the operating-system user who ran it, like the API's changes."""
    first = await bootstrap.bootstrap(reactor, migrated_database, "root", "setup", None)
    with psycopg2.connect(migrated_database) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET disabled = true WHERE name = 'root'")
    second = await bootstrap.bootstrap(reactor, migrated_database, "root", "again", 3600)
    with psycopg2.connect(migrated_database) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, actor_kind, action, subject_kind, subject_id, subject_user, "
                    "details FROM audit_log ORDER BY id")
        rows = cur.fetchall()
        cur.execute("SELECT t.id::text, t.token_hash FROM api_tokens t ORDER BY t.created_at")
        tokens = cur.fetchall()
    assert [bytes(digest) for _, digest in tokens] == [credentials.token_hash(first),
                                                       credentials.token_hash(second)]
    assert [row[:6] for row in rows] == [
        ("bootstrap", "system", action, "user", "root", "root")
        for action in ("user.create", "token.create", "user.update", "token.create")]
    details = [row[6] for row in rows]
    assert {d["operator"] for d in details} == {bootstrap.operator()} != {""}
    assert details[0]["admin"] is True and details[2]["disabled"] is False
    assert [(d["token_id"], d["label"]) for d in (details[1], details[3])] == [
        (tokens[0][0], "setup"), (tokens[1][0], "again")]
    assert details[1]["expires_at"] is None and details[3]["expires_at"] is not None
    assert first not in json.dumps(details) and second not in json.dumps(details)


# -- append-only and retention ---------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "UPDATE audit_log SET actor = 'someone else'",
    "DELETE FROM audit_log",
    "TRUNCATE audit_log",
    # The retention switch is for its own transaction only: a plain SET is refused too.
    "SET treadmill.audit_retention = 'off'; DELETE FROM audit_log",
])
@pytest_twisted.ensureDeferred
async def test_the_table_refuses_changes(world: World, sql: str) -> None:
    await world.sb.admin.post("/api/v1/hosts/rack1/drain")
    count = (await world.sb.store.pool.fetchone("SELECT count(*) AS n FROM audit_log"))["n"]
    with pytest.raises(psycopg2.Error) as e:
        await world.sb.store.pool.execute(sql)
    assert "append-only" in str(e.value)
    after = (await world.sb.store.pool.fetchone("SELECT count(*) AS n FROM audit_log"))["n"]
    assert after == count > 0


@pytest_twisted.ensureDeferred
async def test_retention_deletes_old_records_only(world: World) -> None:
    store = world.sb.store
    marker = uuid.uuid4().hex
    for days in (400, 40, 20, 0):
        await store.pool.execute(
            "INSERT INTO audit_log (at, actor, actor_kind, action, subject_kind, subject_id) "
            "VALUES (now() - make_interval(days => %s), 'system', 'system', 'host.drain', "
            "'host', %s)", (days, f"{marker}-{days}"))

    async def left() -> list[str]:
        rows = await store.pool.fetchall(
            "SELECT subject_id FROM audit_log WHERE subject_id LIKE %s ORDER BY id",
            (f"{marker}-%",))
        return [row["subject_id"].split("-")[1] for row in rows]

    leader = [False]
    retention = RetentionService(reactor, store, 30, is_leader=lambda: leader[0])
    assert await retention.expire() == 0  # not the leader
    assert await RetentionService(reactor, store, 0, lambda: True).expire() == 0  # for ever
    assert await left() == ["400", "40", "20", "0"]
    leader[0] = True
    assert await retention.expire() >= 2
    assert await left() == ["20", "0"]
    assert await store.audit_expire(10) >= 1
    assert await left() == ["0"]


# -- reading: GET /api/v1/audit ---------------------------------------------------------


async def entries(client: Client, query: str = "") -> list[dict]:
    r = await client.get(f"/api/v1/audit{query}")
    assert r.status == 200, r.body
    return r.body["entries"]


@pytest_twisted.ensureDeferred
async def test_who_reads_what(world: World) -> None:
    sb = world.sb
    await sb.admin.post(f"/api/v1/jobs/{world.private_job}/console-token", {"access": "read"})
    await sb.admin.post(f"/api/v1/jobs/{world.shared_job}/console-token", {"access": "manage"})
    everything = await entries(sb.admin, "?limit=500")
    assert {e["subject_id"] for e in everything} >= {world.private_job, world.shared_job}
    # Alice: her own jobs, her own actions, records naming her; never dave's creation.
    alice = await entries(world.alice, "?limit=500")
    assert {e["subject_id"] for e in alice} >= {world.private_job, world.shared_job, "alice"}
    assert all(e["subject_id"] != "dave" for e in alice)
    # Bob sees nothing of alice's private job, nor of alice's records about herself.
    bob = await entries(world.bob, "?limit=500")
    assert bob
    assert all(e["subject_id"] not in (world.private_job, "alice") for e in bob)
    assert await entries(world.bob, f"?job={world.private_job}") == []
    assert await entries(world.bob, "?user=alice") == [e for e in bob if
                                                       e["actor"] == "alice"]
    # Carol reads the shared job, so she sees its records, whoever acted.
    carol = await entries(world.carol, f"?job={world.shared_job}")
    assert {e["actor"] for e in carol} >= {"admin", "carol", "alice"}
    assert await entries(world.carol, f"?job={world.private_job}") == []
    # No token: 401.
    assert (await Client(sb.url).get("/api/v1/audit")).status == 401


@pytest_twisted.ensureDeferred
async def test_a_reused_host_name_shows_its_new_owner_nothing_of_the_old_host(
        world: World) -> None:
    admin = world.sb.admin
    assert (await admin.post("/api/v1/hosts", {"name": "reused", "owner": "alice"})
            ).status == 201
    assert (await world.alice.post("/api/v1/hosts/reused/drain", {})).status == 200
    assert (await admin.delete("/api/v1/hosts/reused")).status == 204
    assert (await admin.post("/api/v1/hosts", {"name": "reused", "owner": "bob"})
            ).status == 201
    assert [(e["actor"], e["action"]) for e in await entries(world.bob, "?host=reused")] \
        == [("admin", "host.create")]
    assert [(e["actor"], e["action"]) for e in await entries(admin, "?host=reused")] == [
        ("admin", "host.create"), ("admin", "host.delete"), ("alice", "host.drain"),
        ("admin", "host.create")]
    # Alice still reads what she did herself.
    assert [e["action"] for e in await entries(world.alice, "?host=reused")] == [
        "host.drain"]


@pytest_twisted.ensureDeferred
async def test_a_reused_image_name_shows_its_new_readers_nothing_of_the_old_image(
        world: World) -> None:
    admin, image = world.sb.admin, "/api/v1/images/lab/reimg"
    body = {"name": "lab/reimg", "digest": DIGEST, "stores": ["https://store.example"]}
    assert (await admin.post("/api/v1/images", body)).status == 201
    assert (await admin.post(f"{image}/grants", {"user": "carol", "privilege": "use"})
            ).status == 201
    assert (await admin.put(image, {"digest": OTHER_DIGEST})).status == 200
    assert (await admin.delete(image)).status == 204
    assert (await admin.post("/api/v1/images", body)).status == 201
    assert (await admin.post(f"{image}/grants", {"user": "bob", "privilege": "use"})
            ).status == 201
    assert [e["action"] for e in await entries(world.bob, "?image=lab/reimg")] == [
        "grant.add", "image.create"]
    # Carol's grant went with the old image: she reads only the record naming her.
    assert [(e["action"], e["subject_user"]) for e in
            await entries(world.carol, "?image=lab/reimg")] == [("grant.add", "carol")]


@pytest_twisted.ensureDeferred
async def test_filters_and_pages(world: World) -> None:
    sb = world.sb
    for _ in range(3):
        await sb.admin.post("/api/v1/hosts/rack1/drain")
    drains = await entries(sb.admin, "?host=RACK1&action=host.drain")
    assert len(drains) >= 3 and {e["action"] for e in drains} == {"host.drain"}
    hosts = await entries(sb.admin, "?action=host")
    assert {e["action"] for e in hosts} >= {"host.drain", "host.create", "host.token"}
    assert all(e["action"].startswith("host.") for e in hosts)
    assert await entries(sb.admin, "?action=host.%25") == []  # LIKE wildcards are literal
    seen, cursor = [], ""
    while True:
        r = await sb.admin.get(f"/api/v1/audit?host=rack1&limit=2{cursor}")
        seen += r.body["entries"]
        if "next_cursor" not in r.body:
            break
        cursor = f"&cursor={r.body['next_cursor']}"
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert ids == [e["id"] for e in await entries(sb.admin, "?host=rack1&limit=500")]
    newest = seen[0]["at"]
    assert await entries(sb.admin, f"?host=rack1&after={newest.replace('+', '%2B')}") == []
    assert len(await entries(sb.admin, "?after=2000-01-01")) > 0


@pytest.mark.parametrize("query", [
    "job=not-a-job", "after=yesterday", "cursor=xyz", "limit=0", "limit=99999999",
    "cursor=YTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5", "user=",  # a9999...: out of range
])
@pytest_twisted.ensureDeferred
async def test_bad_queries_are_400(world: World, query: str) -> None:
    r = await world.sb.admin.get(f"/api/v1/audit?{query}")
    assert r.status == 400 and r.error is not None, r.body


@pytest_twisted.ensureDeferred
async def test_change_and_record_share_one_transaction(world: World) -> None:
    """No change without its record: a record the database refuses undoes the drain; and
    no record without its change: a delete that finds nothing records nothing."""
    sb = world.sb
    await sb.store.create_host("rack9", [], None, "", credentials.token_hash("rack9"))
    await sb.store.pool.execute(
        "CREATE FUNCTION refuse_drains() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.action = 'host.drain' THEN RAISE EXCEPTION 'no drains today'; END IF; "
        "RETURN NEW; END; $$; CREATE TRIGGER refuse_drains BEFORE INSERT ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION refuse_drains()")
    try:
        before = await last_id(sb)
        r = await sb.admin.post("/api/v1/hosts/rack9/drain")
        assert r.status == 500, r.body
        assert (await sb.admin.get("/api/v1/hosts/rack9")).body["enabled"] is True
    finally:
        await sb.store.pool.execute("DROP TRIGGER refuse_drains ON audit_log; "
                                    "DROP FUNCTION refuse_drains()")
    assert await rows_after(sb, before) == []
    assert (await sb.admin.post("/api/v1/hosts/rack9/drain")).status == 200
    assert [row["action"] for row in await rows_after(sb, before)] == ["host.drain"]
    before = await last_id(sb)
    assert (await sb.admin.delete("/api/v1/hosts/no-such-host")).status == 404
    assert (await sb.admin.delete("/api/v1/stores/no-such-store")).status == 404
    assert (await world.alice.delete(f"/api/v1/tokens/{uuid.uuid4()}")).status == 404
    assert await rows_after(sb, before) == []
