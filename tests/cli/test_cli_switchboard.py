"""``tml`` against the real switchboard (``switchboard`` fixture from tests/conftest.py)."""

from __future__ import annotations

import json
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.cli.support import DIGEST

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"


@pytest.fixture
def admin_env(switchboard, tmp_path):
    return switchboard.tml_env(tmp_path)


@pytest_twisted.ensureDeferred
async def test_admin_and_user_flow(tml, switchboard, admin_env, tmp_path):
    r = await tml("whoami", "--json", env=admin_env)
    assert r.status == 0, r.err
    assert json.loads(r.out)["admin"] is True

    r = await tml(
        "admin", "user", "add", "alice", "--password-stdin", env=admin_env, stdin=PASSWORD
    )
    assert r.status == 0, r.err

    cfg = tmp_path / "alice" / "tml.toml"
    alice_env = {"HOME": str(tmp_path), "TREADMILL_CONFIG": str(cfg)}
    r = await tml(
        "login", "--url", switchboard.url, "--user", "alice", "--password-stdin",
        env=alice_env, stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert r.status == 0, r.err
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    r = await tml("whoami", env=alice_env)
    assert r.status == 0, r.err
    assert "alice" in r.out

    r = await tml("token", "ls", "--json", env=alice_env)
    assert r.status == 0, r.err
    (token,) = json.loads(r.out)["tokens"]
    r = await tml("admin", "user", "ls", env=alice_env)
    assert r.status == 1
    assert r.err.startswith("tml: error: ")

    r = await tml("admin", "host", "add", "qemu-1", "--tag", "qemu", "--json", env=admin_env)
    assert r.status == 0, r.err
    assert json.loads(r.out)["token"]
    r = await tml("grant", "host", "qemu-1", "alice", "read", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("host", "ls", env=alice_env)
    assert r.status == 0, r.err
    assert "qemu-1" in r.out
    r = await tml("grant", "ls", "host", "qemu-1", "--json", env=admin_env)
    assert [(g["user"], g["privilege"]) for g in json.loads(r.out)["grants"]] == [("alice", "read")]
    r = await tml("revoke", "host", "qemu-1", "alice", "read", env=admin_env)
    assert r.status == 0, r.err

    r = await tml("token", "revoke", token["id"], env=alice_env)
    assert r.status == 0, r.err
    r = await tml("whoami", env=alice_env)
    assert r.status == 1


@pytest_twisted.ensureDeferred
async def test_images_with_slash_and_grants(tml, admin_env):
    r = await tml("admin", "store", "add", "http://store.example/", "store", env=admin_env)
    assert r.status == 0, r.err
    r = await tml(
        "image", "register", "team/debian", DIGEST, "--store", "http://store.example",
        env=admin_env,
    )  # fmt: skip
    assert r.status == 0, r.err
    r = await tml("image", "show", "team/debian", "--json", env=admin_env)
    assert r.status == 0, r.err
    assert json.loads(r.out)["digest"] == DIGEST
    r = await tml("grant", "image", "team/debian", "*", "use", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("grant", "ls", "image", "team/debian", "--json", env=admin_env)
    assert r.status == 0, r.err
    assert json.loads(r.out)["grants"][0]["user"] == "*"
    r = await tml("revoke", "image", "team/debian", "*", "use", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("image", "rm", "team/debian", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("image", "show", "team/debian", env=admin_env)
    assert r.status == 1


@pytest_twisted.ensureDeferred
async def test_submit_follow_then_cancel(tml, admin_env):
    r = await tml("admin", "store", "add", "http://s.example", "s", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("image", "register", "img", DIGEST, "--store", "http://s.example", env=admin_env)
    assert r.status == 0, r.err
    submit = tml("job", "submit", "img", "--tag", "nowhere", "--follow", env=admin_env)
    following = Deferred.fromCoroutine(submit)
    for _ in range(200):
        r = await tml("job", "ls", "--json", env=admin_env)
        jobs = json.loads(r.out)["jobs"]
        if jobs:
            break
        await deferLater(reactor, 0.02, lambda: None)
    (job,) = jobs
    r = await tml("job", "cancel", job["id"], env=admin_env)
    assert r.status == 0, r.err
    result = await following
    assert result.status == 5, result.err
    assert result.out.splitlines()[0] == job["id"]
    assert "terminated" in result.out.splitlines()[-1]
    assert "user_terminated" in result.err

    r = await tml("job", "events", job["id"], env=admin_env)
    assert r.status == 0, r.err
    assert r.out.splitlines()[-1].split()[2] == "terminated"
    r = await tml("job", "show", job["id"], env=admin_env)
    assert "reason:" in r.out
    # A dashboard's --owner finds the user whatever the case it is spelt in.
    r = await tml("job", "ls", "--owner", "ADMIN", "--json", env=admin_env)
    assert r.status == 0, r.err
    assert [j["id"] for j in json.loads(r.out)["jobs"]] == [job["id"]]


@pytest_twisted.ensureDeferred
async def test_namespace_grants(tml, switchboard, admin_env):
    await switchboard.user("bob")
    r = await tml("grant", "namespace", "Team", "bob", "manage", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("grant", "ls", "namespace", "team", "--json", env=admin_env)
    assert r.status == 0, r.err
    assert [(g["user"], g["privilege"]) for g in json.loads(r.out)["grants"]] == [
        ("bob", "manage")]
    r = await tml("revoke", "namespaces", "team", "bob", "manage", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("grant", "ls", "namespace", "team", "--json", env=admin_env)
    assert json.loads(r.out)["grants"] == []


@pytest_twisted.ensureDeferred
async def test_admin_store_add_ls_rm(tml, switchboard, admin_env):
    r = await tml("admin", "store", "add", "https://Store.example:5000/", "store-1",
                  "--description", "main", env=admin_env)
    assert r.status == 0, r.err
    assert "https://store.example:5000" in r.out and "store-1" in r.out
    r = await tml("admin", "store", "add", "http://cache.site", "cache-1", "--cache",
                  "--json", env=admin_env)
    assert r.status == 0 and json.loads(r.out)["cache"] is True, r.err
    r = await tml("admin", "store", "add", "https://store.example:5000", "again",
                  env=admin_env)
    assert r.status == 1 and "already registered" in r.err
    user = await switchboard.user("alice")
    alice_env = {**admin_env, "TREADMILL_TOKEN": user.token}
    r = await tml("admin", "store", "add", "https://x.example", "x", env=alice_env)
    assert r.status == 1 and "admin" in r.err
    r = await tml("admin", "store", "ls", "--json", env=alice_env)  # listing: any user
    assert r.status == 0, r.err
    assert [(s["url"], s["service"], s["cache"]) for s in json.loads(r.out)["stores"]] == [
        ("http://cache.site", "cache-1", True), ("https://store.example:5000", "store-1", False)]
    r = await tml("admin", "store", "ls", env=alice_env)
    assert "cache-1" in r.out and "main" in r.out
    r = await tml("admin", "store", "rm", "http://cache.site/", env=admin_env)
    assert r.status == 0 and "cache-1" in r.out, r.err
    r = await tml("admin", "store", "rm", "store-1", env=admin_env)
    assert r.status == 0, r.err
    r = await tml("admin", "store", "rm", "store-1", env=admin_env)
    assert r.status == 1 and "no image store" in r.err
    r = await tml("admin", "store", "ls", "--json", env=admin_env)
    assert json.loads(r.out)["stores"] == []


@pytest_twisted.ensureDeferred
async def test_logs_follow_without_log_servers_ends_at_once(tml, admin_env):
    r = await tml("job", "submit", DIGEST, "--tag", "nowhere", env=admin_env)
    assert r.status == 0, r.err
    job_id = r.out.strip()
    following = Deferred.fromCoroutine(tml("job", "logs", job_id[:8], "-f", env=admin_env))
    r = await following.addTimeout(5, reactor)
    assert r.status == 1 and "has no log servers" in r.err, r.err
    r = await tml("job", "cancel", job_id, env=admin_env)
    assert r.status == 0, r.err
