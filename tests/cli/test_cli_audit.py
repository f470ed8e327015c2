"""``tml audit`` against the real switchboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_audit(tml, switchboard, tmp_path: Path) -> None:
    alice = await switchboard.user("alice")
    await switchboard.user("bob")
    env = switchboard.tml_env(tmp_path, alice.token)
    admin_env = switchboard.tml_env(tmp_path)
    assert (await switchboard.admin.post("/api/v1/hosts", {"name": "rack1"})).status == 201
    for _ in range(3):
        assert (await switchboard.admin.post("/api/v1/hosts/rack1/drain")).status == 200
    r = await switchboard.admin.post("/api/v1/tokens", {"user": "bob", "label": "ci"})
    bob_token = r.body["token"]
    await alice.post("/api/v1/tokens", {"label": "mine"})

    r = await tml("audit", "--host", "rack1", env=admin_env)
    assert r.status == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "SOURCE", "ACTION", "SUBJECT", "DETAILS"]
    assert [line.split()[3] for line in lines[1:]] == ["host.drain"] * 3 + ["host.create"]
    assert all("127.0.0.1" in line and "host:rack1" in line for line in lines[1:])

    r = await tml("audit", "--action", "host", "--limit", "2", "--json", env=admin_env)
    data = json.loads(r.out)
    assert len(data["entries"]) == 2 and "next_cursor" in data
    r = await tml("audit", "--action", "host", "--limit", "2", env=admin_env)
    assert "use --all" in r.err
    r = await tml("audit", "--action", "host", "--limit", "2", "--all", "--json", env=admin_env)
    assert [e["action"] for e in json.loads(r.out)["entries"]] == (
        ["host.drain"] * 3 + ["host.create"])

    r = await tml("audit", "--user", "bob", "--json", env=admin_env)
    (entry,) = json.loads(r.out)["entries"]
    assert (entry["action"], entry["actor"], entry["subject_id"]) == ("token.create", "admin",
                                                                      "bob")
    assert bob_token not in r.out

    # Alice sees her own token's record only: not the host's, nor bob's.
    r = await tml("audit", "--json", env=env)
    assert [(e["action"], e["subject_id"]) for e in json.loads(r.out)["entries"]] == [
        ("token.create", "alice")]
    r = await alice.post("/api/v1/jobs", {"image": "sha256:" + "ab" * 32})
    job = r.body["id"]
    assert (await alice.post(f"/api/v1/jobs/{job}/terminate")).status == 200
    r = await tml("audit", "--job", job[:8], "--json", env=env)  # a prefix resolves
    assert r.status == 0, r.err
    assert [(e["action"], e["subject_id"]) for e in json.loads(r.out)["entries"]] == [
        ("job.cancel", job)]
    r = await tml("audit", "--after", "not a time", env=env)
    assert r.status == 1 and "after" in r.err
    r = await tml("audit", "--user", "a", "--host", "b", env=env)
    assert r.status == 2
