"""Job id prefixes: ``GET /api/v1/jobs?id_prefix=`` and ``?restart_of=`` on the real
switchboard, and ``tml`` resolving short ids with them."""

from __future__ import annotations

import argparse
import json

import pytest
import pytest_twisted

from tests.cli.support import DIGEST, commands
from treadmill.cli.main import build_parser


def test_every_job_id_argument_takes_a_prefix() -> None:
    """Unique prefixes are accepted wherever a job id is (issue 14): every positional
    argument of a ``tml job …`` command named ``id`` or ``job`` is resolved."""
    unresolved = []
    for path, parser in commands(build_parser()):
        if path[:1] != ("job",):
            continue
        for action in parser._actions:
            if (not action.option_strings and action.dest in ("id", "job")
                    and not isinstance(action, argparse._SubParsersAction)
                    and action.dest not in (parser.get_default("job_id_args") or ())):
                unresolved.append(f"tml {' '.join(path)} {action.dest.upper()}")
    assert not unresolved, unresolved


async def _jobs(client, query: str) -> list[str]:
    r = await client.get(f"/api/v1/jobs?{query}")
    assert r.status == 200, r.body
    return [j["id"] for j in r.body["jobs"]]


@pytest.mark.slow
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


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_tml_resolves_unique_prefixes_only(tml, switchboard, tmp_path) -> None:
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    env = {"HOME": str(tmp_path), "TREADMILL_URL": switchboard.url,
           "TREADMILL_TOKEN": alice.token}
    bob_env = {**env, "TREADMILL_TOKEN": bob.token}
    by_first: dict[str, list[str]] = {}
    while not any(len(ids) > 1 for ids in by_first.values()):  # at most 17 jobs
        r = await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["nowhere"]})
        by_first.setdefault(r.body["id"][0], []).append(r.body["id"])
    shared = next(ids for ids in by_first.values() if len(ids) > 1)
    job = shared[0]
    unique = next(job[:n] for n in range(2, 37)
                  if not any(o != job and o.startswith(job[:n])
                             for ids in by_first.values() for o in ids))
    r = await tml("job", "show", unique, "--json", env=env)
    assert r.status == 0, r.err
    assert json.loads(r.out)["id"] == job
    r = await tml("job", "events", unique.upper(), env=env)
    assert r.status == 0, r.err
    r = await tml("job", "results", unique, "--junit", env=env)
    assert r.status == 1 and f"job {job} has no log servers" in r.err, r.err  # resolved
    # tml-job-ID, the SSH host name tml job ssh gives a job (ssh_config's %h).
    for alias in (f"tml-job-{unique}", f"tml-job-{job}"):
        r = await tml("job", "show", alias, "--json", env=env)
        assert r.status == 0 and json.loads(r.out)["id"] == job, r.err
    # Ambiguous: a clear error listing the candidates, and nothing done.
    r = await tml("job", "cancel", job[0], env=env)
    assert r.status == 1
    assert r.err.startswith(f"tml: error: job id prefix {job[0]} is ambiguous; it matches:")
    for other in shared:
        assert f"\n  {other}  queued  " in r.err
    for other in shared:
        assert (await alice.get(f"/api/v1/jobs/{other}")).body["state"] == "queued"
    # Bob cannot tell that Alice's job exists.
    r = await tml("job", "show", unique, env=bob_env)
    assert (r.status, r.err) == (1, f"tml: error: no job you can see has an id starting with "
                                    f"{unique}\n")
    r = await tml("job", "show", job, env=bob_env)
    assert r.status == 1 and "no job" in r.err
    # Granted read, Bob sees it, by its prefix too; revoked, no more.
    r = await tml("grant", "job", unique, "bob", "read", env=env)
    assert r.status == 0, r.err
    assert f"granted read on job {job} to bob" in r.out
    r = await tml("grant", "ls", "job", unique, "--json", env=env)
    assert [g["user"] for g in json.loads(r.out)["grants"]] == ["bob"], r.err
    r = await tml("job", "show", unique, "--json", env=bob_env)
    assert r.status == 0 and json.loads(r.out)["id"] == job, r.err
    r = await tml("revoke", "job", unique, "bob", "read", env=env)
    assert r.status == 0, r.err
    r = await tml("job", "show", unique, env=bob_env)
    assert r.status == 1, r.out
    # Not hexadecimal: a usage error before any request.
    r = await tml("job", "show", "zz", env=env)
    assert r.status == 2 and "not a job id or a prefix of one" in r.err
    r = await tml("job", "cancel", unique, env=env)
    assert r.status == 0, r.err
    assert (await alice.get(f"/api/v1/jobs/{job}")).body["state"] == "terminated"
