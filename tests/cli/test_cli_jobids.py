"""Job id prefixes: ``GET /api/v1/jobs?id_prefix=`` and ``?restart_of=`` on the real
switchboard, and ``tml`` resolving short ids with them."""

from __future__ import annotations

import pytest
import pytest_twisted

pytestmark = pytest.mark.slow

DIGEST = "sha256:" + "0123456789abcdef" * 4


async def _jobs(client, query: str) -> list[str]:
    r = await client.get(f"/api/v1/jobs?{query}")
    assert r.status == 200, r.body
    return [j["id"] for j in r.body["jobs"]]


@pytest_twisted.ensureDeferred
async def test_id_prefix_filter_and_what_others_see(switchboard) -> None:
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    ids = []
    for _ in range(3):
        r = await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["nowhere"]})
        assert r.status == 201, r.body
        ids.append(r.body["id"])
    for job in ids:
        for prefix in (job[:1], job[:8], job[:13], job[:13].replace("-", ""), job.upper(),
                       job):
            found = await _jobs(alice, f"id_prefix={prefix}")
            assert job in found, prefix
            assert all(f.replace("-", "").startswith(prefix.replace("-", "").lower())
                       for f in found)
        assert await _jobs(alice, f"id_prefix={job}") == [job]
        # Bob may not read Alice's jobs: a prefix shows him nothing, as the list does.
        assert await _jobs(bob, f"id_prefix={job[:8]}") == []
        assert await _jobs(switchboard.admin, f"id_prefix={job}") == [job]
    for bad in ("xyz", "%25", "_", "0" * 33, "-", "a" * 37, "1234%"):
        r = await alice.get(f"/api/v1/jobs?id_prefix={bad}")
        assert r.status == 400 and r.error == "bad_request", (bad, r.body)
    r = await alice.get("/api/v1/jobs?restart_of=nope")
    assert r.status == 400 and r.error == "bad_request", r.body
    assert await _jobs(alice, f"restart_of={ids[0]}") == []
