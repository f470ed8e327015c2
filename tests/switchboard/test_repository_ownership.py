"""Repository takeover (security issue 12): canonical names and owned namespaces.

Each attack of the audit is tried through the real API, and then the token
endpoint is asked, as the attacker, for every action on the victims'
repositories: it must grant nothing. Then a table of who may do what to an
image repository, one test per principal.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import pytest_twisted

from tests.support import Client, RunningSwitchboard
from tests.switchboard.support import basic, grants
from treadmill.switchboard import credentials

DIGEST = "sha256:" + "e" * 64
STORE = "http://s.example"
# Every repository of alice's or the admin's that an attack aims at.
VICTIMS = ("alice/fw", "alice", "alice-img", "demo", "alice/x", "alice/new", "board-demo",
           "unclaimed/thing", "unclaimed")


async def image(client: Client, name: str) -> int:
    r = await client.post("/api/v1/images", {"name": name, "digest": DIGEST, "stores": [STORE]})
    return r.status


async def attacker_gets_nothing(sb: RunningSwitchboard, attacker: Client) -> None:
    """The token endpoint grants ``attacker`` no action on any victim repository."""
    status, got = await grants(sb, attacker, *(f"repository:{v}:*" for v in VICTIMS),
                               *(f"repository:{v}:pull,push,delete" for v in VICTIMS))
    assert (status, got) == (200, {})


@pytest_twisted.async_yield_fixture
async def world(switchboard: RunningSwitchboard):
    """alice owns ``alice/fw``; the admin owns the top-level ``demo``; bob attacks."""
    await switchboard.register_store(STORE, "store-1")
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    assert await image(alice, "alice/fw") == 201
    assert await image(switchboard.admin, "demo") == 201
    yield alice, bob


@pytest_twisted.ensureDeferred
async def test_bob_cannot_register_a_name_outside_his_namespace(
        switchboard: RunningSwitchboard, world) -> None:
    _, bob = world
    for name in ("ALICE/fw", "Alice", "alice-IMG", "DEMO", "alice/x", "Alice/New", "board-demo",
                 "unclaimed/thing"):
        r = await bob.post("/api/v1/images", {"name": name, "digest": DIGEST,
                                              "stores": [STORE]})
        assert r.status == 403 and r.error == "forbidden", (name, r.body)
        assert "bob/NAME" in r.body["error"]["message"]
        await attacker_gets_nothing(switchboard, bob)
    names = [i["name"] for i in (await switchboard.admin.get("/api/v1/images")).body["images"]]
    assert names == ["alice/fw", "demo"]


@pytest_twisted.ensureDeferred
async def test_names_differing_only_in_case_conflict(switchboard: RunningSwitchboard,
                                                     world) -> None:
    alice, bob = world
    admin = switchboard.admin
    r = await alice.post("/api/v1/images", {"name": "ALICE/FW", "digest": DIGEST,
                                            "stores": [STORE]})
    assert r.status == 409 and "'alice/fw'" in r.body["error"]["message"], r.body
    assert await image(admin, "Demo") == 409
    # Lookups are canonical too: every spelling names the one image.
    r = await alice.get("/api/v1/images/Alice/FW")
    assert r.status == 200 and r.body["name"] == "alice/fw"

    from treadmill.switchboard.store.errors import Conflict

    for name in ("ALICE", "Alice", "aLiCe"):
        r = await admin.post("/api/v1/users", {"name": name})
        assert r.status == 409, r.body
        assert f"{name!r} already exists as 'alice'" in r.body["error"]["message"], r.body
        # The store refuses it too (the unique index), whoever calls it.
        with pytest.raises(Conflict):
            await switchboard.store.create_user(name, False, None)
    # A user would own the namespace of the same name: not one that holds images.
    r = await admin.post("/api/v1/users", {"name": "Demo"})
    assert r.status == 409 and "demo" in r.body["error"]["message"], r.body
    r = await admin.post("/api/v1/users", {"name": "carol"})
    assert r.status == 201
    assert [u["name"] for u in (await admin.get("/api/v1/users")).body["users"]
            ] == ["admin", "alice", "bob", "carol"]
    await attacker_gets_nothing(switchboard, bob)
    # A user is themself in any spelling, and no one else.
    assert (await alice.get("/api/v1/users/ALICE")).body["name"] == "alice"
    assert (await alice.get("/api/v1/tokens?user=Alice")).status == 200
    assert (await bob.get("/api/v1/users/ALICE")).status == 403
    assert (await bob.patch("/api/v1/users/Alice", {"password": "long enough password"})
            ).status == 403


@pytest_twisted.ensureDeferred
async def test_bob_cannot_push_anywhere_but_his_namespace(switchboard: RunningSwitchboard,
                                                          world) -> None:
    """No catalogue entry at all: alice's namespace, a top-level name, a name no one
    claimed (the old "unclaimed" rule): nothing. His own namespace: everything."""
    alice, bob = world
    await attacker_gets_nothing(switchboard, bob)
    status, got = await grants(switchboard, bob, "repository:bob/new:*", "repository:bob:push")
    assert got == {"bob/new": ("pull", "push", "delete"), "bob": ("push",)}
    # Registering in his own namespace gives him nothing more elsewhere.
    assert await image(bob, "bob/fw") == 201
    await attacker_gets_nothing(switchboard, bob)
    # Basic credentials name the user canonically; bob's token under alice's name
    # is refused, never alice's.
    status, got = await grants(switchboard, None, "repository:alice/fw:push",
                               headers=basic("ALICE", str(alice.token)))
    assert got == {"alice/fw": ("push",)}
    status, _ = await grants(switchboard, None, "repository:alice/fw:push",
                             headers=basic("Alice", str(bob.token)))
    assert status == 401


async def ended_job_on_a_host(sb: RunningSwitchboard, owner: Client, host: str) -> str:
    """A terminated job of ``owner`` that ran on a new host ``host``."""
    r = await sb.admin.post("/api/v1/hosts", {"name": host, "tags": [host]})
    assert r.status == 201
    host_id = (await sb.store.host_by_token(credentials.token_hash(r.body["token"])))["id"]
    r = await owner.post("/api/v1/jobs", {"image": DIGEST, "tags": [host]})
    assert r.status == 201, r.body
    await sb.store.pool.execute("UPDATE jobs SET host_id = %s, state = 'terminated' "
                                "WHERE id = %s", (host_id, r.body["id"]))
    return r.body["id"]


@pytest_twisted.ensureDeferred
async def test_images_registered_before_namespaces_were_owned(switchboard: RunningSwitchboard,
                                                             world) -> None:
    """Rows the old rules let bob create: one in alice's namespace lends nothing, to
    bob or to those he shares it with, and runs no job; a top-level one still lends
    pull (as before), but no push."""
    _, bob = world
    store = switchboard.store
    bob_id = await store.user_id("bob")
    carol = await switchboard.user("carol")
    for name in ("ALICE/legacy", "Alice", "old-image"):
        await store.create_image(name, DIGEST, [STORE], bob_id, "")
        r = await bob.post(f"/api/v1/images/{name}/grants", {"user": "carol", "privilege": "use"})
        assert r.status == 201, r.body
    for who in (bob, carol):
        _, got = await grants(switchboard, who, "repository:alice/legacy:*", "repository:alice:*",
                              "repository:old-image:*")
        assert got == {"old-image": ("pull",)}
        for name in ("ALICE/legacy", "alice"):
            r = await who.post("/api/v1/jobs", {"image": name})
            assert r.status == 403 and "namespace" in r.body["error"]["message"], r.body
        assert (await who.post("/api/v1/jobs", {"image": "old-image"})).status == 201
    await attacker_gets_nothing(switchboard, bob)
    # An admin's grant of alice's namespace to bob makes his image lend again.
    r = await switchboard.admin.post("/api/v1/namespaces/alice/grants",
                                     {"user": "bob", "privilege": "manage"})
    assert r.status == 201
    _, got = await grants(switchboard, carol, "repository:alice/legacy:pull")
    assert got == {"alice/legacy": ("pull",)}


@pytest_twisted.ensureDeferred
async def test_bob_cannot_snapshot_into_someone_elses_namespace(
        switchboard: RunningSwitchboard, world) -> None:
    _, bob = world
    job = await ended_job_on_a_host(switchboard, bob, "qemu-1")
    host_id = (await switchboard.store.pool.fetchone("SELECT id FROM hosts"))["id"]
    for name in ("alice/snap", "ALICE/snap", "snap", "demo2"):
        r = await bob.post(f"/api/v1/jobs/{job}/snapshots", {"name": name, "store": STORE})
        assert r.status == 403, (name, r.body)
        assert await switchboard.store.snapshot_repositories(host_id) == []
    r = await bob.post(f"/api/v1/jobs/{job}/snapshots", {"name": "Bob/Snap", "store": STORE})
    assert r.status == 202 and r.body["repository"] == "bob/snap", r.body
    assert await switchboard.store.snapshot_repositories(host_id) == ["bob/snap"]


@pytest_twisted.ensureDeferred
async def test_namespace_grants(switchboard: RunningSwitchboard, world) -> None:
    alice, bob = world
    admin = switchboard.admin
    carol = await switchboard.user("carol")
    # Only admins grant namespaces, by canonical name.
    r = await alice.post("/api/v1/namespaces/team/grants", {"user": "bob", "privilege": "manage"})
    assert r.status == 403
    for bad in ("te%21am", "-team", "team__-x"):
        r = await admin.post(f"/api/v1/namespaces/{bad}/grants",
                             {"user": "bob", "privilege": "manage"})
        assert r.status == 400 and r.error == "bad_request", (bad, r.body)
    r = await admin.post("/api/v1/namespaces/team/grants", {"user": "bob", "privilege": "read"})
    assert r.status == 400
    r = await admin.post("/api/v1/namespaces/TEAM/grants", {"user": "BOB", "privilege": "manage"})
    assert r.status == 201, r.body
    r = await admin.post("/api/v1/namespaces/team/grants", {"user": "carol", "privilege": "use"})
    assert r.status == 201
    r = await admin.post("/api/v1/namespaces/team/grants", {"user": "bob", "privilege": "manage"})
    assert r.status == 409
    listed = (await admin.get("/api/v1/namespaces/Team/grants")).body["grants"]
    assert [(g["user"], g["privilege"]) for g in listed] == [("bob", "manage"), ("carol", "use")]
    # Another namespace's grants are not these.
    assert (await admin.get("/api/v1/namespaces/teams/grants")).body["grants"] == []

    assert await image(bob, "Team/FW") == 201
    assert await image(carol, "team/other") == 403
    _, got = await grants(switchboard, bob, "repository:team/fw:*", "repository:team:push",
                          "repository:teams/x:push")
    assert got == {"team/fw": ("pull", "push", "delete"), "team": ("push",)}
    _, got = await grants(switchboard, carol, "repository:team/fw:*",
                          "repository:team/y:pull,push")
    assert got == {"team/fw": ("pull",), "team/y": ("pull",)}
    await attacker_gets_nothing(switchboard, bob)

    r = await admin.delete("/api/v1/namespaces/team/grants/bob/manage")
    assert r.status == 204
    r = await admin.delete("/api/v1/namespaces/team/grants/bob/manage")
    assert r.status == 404
    _, got = await grants(switchboard, bob, "repository:team/fw:*")
    assert got == {"team/fw": ("pull",)}  # He still owns the catalogue image team/fw.
    r = await admin.post("/api/v1/namespaces/team/grants", {"user": "*", "privilege": "use"})
    assert r.status == 201
    _, got = await grants(switchboard, alice, "repository:team/z:pull,push")
    assert got == {"team/z": ("pull",)}


# -- the matrix ------------------------------------------------------------------------

ACTIONS = ("pull", "push", "delete", "mount", "catalog", "snapshot")


@dataclass(frozen=True)
class Principal:
    """Who asks, and what each action on alice's ``alice/fw`` gives them.

    ``mount`` is a cross-repository mount from ``alice/fw`` into the caller's own
    repository (pull on the source and push on the target); ``snapshot`` is push
    on ``alice/snap``, the repository of a pending snapshot of alice's.
    """

    name: str
    allowed: frozenset[str]


MATRIX = [
    Principal("anonymous", frozenset()),
    Principal("owner", frozenset({"pull", "push", "delete", "mount", "snapshot"})),
    Principal("other", frozenset()),
    Principal("image-user", frozenset({"pull", "mount"})),  # use on the image
    Principal("image-manager", frozenset({"pull", "mount"})),  # manage on the image
    Principal("namespace-reader", frozenset({"pull", "mount"})),  # use on namespace alice
    Principal("namespace-writer", frozenset({"pull", "push", "delete", "mount", "snapshot"})),
    Principal("admin", frozenset(ACTIONS)),
    Principal("host-job", frozenset({"pull"})),  # runs a job of alice/fw
    Principal("host-snapshot", frozenset({"snapshot"})),  # makes alice's snapshot
]


async def principal_credentials(sb: RunningSwitchboard, alice: Client, name: str
                                ) -> tuple[Client | None, dict[str, str], str]:
    """The client (or host token headers) of a MATRIX principal, and its mount target."""
    admin = sb.admin
    if name == "anonymous":
        return None, {}, "anonymous/copy"
    if name == "owner":
        return alice, {}, "alice/copy"
    if name == "admin":
        return admin, {}, "admin/copy"
    if name.startswith("host-"):
        r = await admin.post("/api/v1/hosts", {"name": name, "tags": [name]})
        headers = {"authorization": f"Bearer {r.body['token']}"}
        host_id = (await sb.store.host_by_token(credentials.token_hash(r.body["token"])))["id"]
        job = (await alice.post("/api/v1/jobs", {"image": "alice/fw", "tags": [name]})).body
        state = "assigned" if name == "host-job" else "terminated"
        await sb.store.pool.execute("UPDATE jobs SET host_id = %s, state = %s WHERE id = %s",
                                    (host_id, state, job["id"]))
        if name == "host-snapshot":
            alice_id = await sb.store.user_id("alice")
            await sb.store.create_snapshot(job["id"], host_id, alice_id, "alice/snap",
                                           "alice/snap", STORE, "")
            return None, headers, "alice/snap"
        return None, headers, f"{name}/copy"
    client = await sb.user(name)
    grant = {"image-user": ("images/alice/fw", "use"),
             "image-manager": ("images/alice/fw", "manage"),
             "namespace-reader": ("namespaces/alice", "use"),
             "namespace-writer": ("namespaces/alice", "manage")}.get(name)
    if grant is not None:
        r = await admin.post(f"/api/v1/{grant[0]}/grants", {"user": name, "privilege": grant[1]})
        assert r.status == 201, r.body
    return client, {}, f"{name}/copy"


@pytest_twisted.ensureDeferred
async def test_repository_matrix(switchboard: RunningSwitchboard) -> None:
    """Every principal of MATRIX asks for every action; the table of what the token
    endpoint grants must be MATRIX exactly."""
    sb = switchboard
    await sb.register_store(STORE, "store-1")
    alice = await sb.user("alice")
    assert await image(alice, "alice/fw") == 201
    table: dict[str, frozenset[str]] = {}
    for principal in MATRIX:
        client, headers, target = await principal_credentials(sb, alice, principal.name)

        async def ask(*scopes: str) -> dict:
            status, got = await grants(sb, client, *scopes, headers=headers)  # noqa: B023
            assert status == 200, got
            return got

        got: dict[str, bool] = {}
        for action in ("pull", "push", "delete"):
            got[action] = (await ask(f"repository:alice/fw:{action}")
                           ).get("alice/fw") == (action,)
        both = await ask("repository:alice/fw:pull", f"repository:{target}:push")
        got["mount"] = both.get("alice/fw") == ("pull",) and both.get(target) == ("push",)
        got["catalog"] = (await ask("registry:catalog:*")).get("catalog") == ("*",)
        got["snapshot"] = (await ask("repository:alice/snap:push")
                           ).get("alice/snap") == ("push",)
        # "*" never gives more than the concrete actions held.
        star = set((await ask("repository:alice/fw:*")).get("alice/fw", ()))
        assert star == {a for a in ("pull", "push", "delete") if got[a]}, principal.name
        table[principal.name] = frozenset(a for a, ok in got.items() if ok)
    assert table == {p.name: p.allowed for p in MATRIX}


# -- migration 0007 ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_migration_names_the_names_that_clash_in_case(database: str) -> None:
    """A database from before 0007 with names that differ only in case: the migration
    stops, naming them all, and writes nothing; once renamed, it applies."""
    import psycopg2
    from twisted.internet import reactor

    from treadmill.switchboard.database import Pool, migrate, migrations

    pool = Pool(reactor, database, size=1)
    await pool.start()
    try:
        async def before_0007(cur) -> None:
            await cur.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                              "name text NOT NULL, applied_at timestamptz NOT NULL "
                              "DEFAULT now())")
            for version, name, sql in migrations():
                if version < 7:
                    await cur.execute(sql)
                    await cur.execute("INSERT INTO schema_migrations (version, name) "
                                      "VALUES (%s, %s)", (version, name))
            await cur.execute("INSERT INTO users (name) VALUES ('alice'), ('ALICE'), "
                              "('Alice'), ('bob')")
            await cur.execute("INSERT INTO images (name, digest) VALUES ('demo', 'd'), "
                              "('DEMO', 'd'), ('fw', 'd')")

        await pool.transaction(before_0007)
        with pytest.raises(psycopg2.Error) as failed:
            await migrate(pool)
        message = str(failed.value)
        assert "Users: ALICE, Alice, alice." in message
        assert "Images: DEMO, demo." in message and "Pending snapshots: none." in message
        assert "bob" not in message and "fw" not in message
        row = await pool.fetchone("SELECT max(version) AS v FROM schema_migrations")
        assert row["v"] == 6
        await pool.execute("UPDATE users SET name = name || '-' || id WHERE name <> 'alice'")
        await pool.execute("DELETE FROM images WHERE name = 'DEMO'")
        assert [name for name in await migrate(pool) if name.startswith("0007")]
        with pytest.raises(psycopg2.errors.UniqueViolation):
            await pool.execute("INSERT INTO users (name) VALUES ('ALICE')")
    finally:
        pool.close()
