"""Console patterns (docs/results.md) in the catalogue and in jobs: checked, stored, shown,
and sent to the supervisor in start_job."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from tests.support import RunningSwitchboard

DIGEST = "sha256:" + "e" * 64
STORE = "http://store.example"
TOCK = {"test_case": r"^test (?P<name>\S+) \.\.\. (?P<result>ok|FAILED)",
        "end": "^test result: "}
UBOOT = {"pass": r"^Failures: 0$", "fail": r"^Failures: [1-9]"}

BAD: list[tuple[Any, str]] = [
    ({}, "results: is invalid (minProperties)"),
    ("^x$", "results: "),
    ({"ends": "x"}, "results: "),
    ({"end": "a" * 513}, "results.end: "),
    ({"end": "(unclosed"}, "results.end: not an RE2 regular expression"),
    ({"end": r"(a)\1"}, "results.end: not an RE2 regular expression"),
    ({"fail": "(?<=x)y"}, "results.fail: not an RE2 regular expression"),
    ({"test_case": "(?P<name>.*)"}, "needs a named group (?P<result>...)"),
    ({"test_case": "(?P<name>.)(?P<result>.)(?P<other>.)"}, "unknown named group 'other'"),
]


@pytest_twisted.ensureDeferred
async def test_job_patterns_are_stored_and_shown(switchboard: RunningSwitchboard) -> None:
    admin = switchboard.admin
    r = await admin.post("/api/v1/jobs", {"image": DIGEST, "results": TOCK})
    assert r.status == 201, r.body
    assert r.body["results"] == {"patterns": TOCK, "stream": "results",
                                 "servers": r.body["logs"]}
    shown = (await admin.get(f"/api/v1/jobs/{r.body['id']}")).body
    assert shown["results"]["patterns"] == TOCK
    plain = (await admin.post("/api/v1/jobs", {"image": DIGEST})).body
    assert plain["results"]["patterns"] is None


@pytest_twisted.ensureDeferred
async def test_a_job_takes_its_images_patterns_unless_it_has_its_own(
        switchboard: RunningSwitchboard) -> None:
    admin = switchboard.admin
    await switchboard.register_store(STORE, "store")
    r = await admin.post("/api/v1/images", {"name": "board-fw", "digest": DIGEST,
                                            "stores": [STORE], "results": UBOOT})
    assert r.status == 201 and r.body["results"] == UBOOT
    job = (await admin.post("/api/v1/jobs", {"image": "board-fw"})).body
    assert job["results"]["patterns"] == UBOOT
    job = (await admin.post("/api/v1/jobs", {"image": "board-fw", "results": TOCK})).body
    assert job["results"]["patterns"] == TOCK  # the job's replace the image's as a whole
    job = (await admin.post("/api/v1/jobs", {"image": DIGEST})).body
    assert job["results"]["patterns"] is None  # a bare digest names no catalogue entry
    r = await admin.put("/api/v1/images/board-fw", {"description": "patterns kept"})
    assert r.body["results"] == UBOOT
    r = await admin.put("/api/v1/images/board-fw", {"results": TOCK})
    assert r.body["results"] == TOCK
    r = await admin.put("/api/v1/images/board-fw", {"results": None})
    assert r.body["results"] is None
    job = (await admin.post("/api/v1/jobs", {"image": "board-fw"})).body
    assert job["results"]["patterns"] is None


@pytest_twisted.ensureDeferred
async def test_bad_patterns_are_refused_everywhere(switchboard: RunningSwitchboard) -> None:
    admin = switchboard.admin
    await switchboard.register_store(STORE, "store")
    await admin.post("/api/v1/images", {"name": "fw2", "digest": DIGEST, "stores": [STORE],
                                        "results": UBOOT})
    before = (await admin.get("/api/v1/jobs")).body["jobs"]
    for patterns, problem in BAD:  # one switchboard for every case: fast
        r = await admin.post("/api/v1/jobs", {"image": DIGEST, "results": patterns})
        assert r.status == 400 and problem in r.body["error"]["message"], (patterns, r.body)
        r = await admin.post("/api/v1/images", {"name": "fw", "digest": DIGEST,
                                                "stores": [STORE], "results": patterns})
        assert r.status == 400 and problem in r.body["error"]["message"], (patterns, r.body)
        assert (await admin.get("/api/v1/images/fw")).status == 404
        r = await admin.put("/api/v1/images/fw2", {"results": patterns})
        assert r.status == 400 and problem in r.body["error"]["message"], (patterns, r.body)
        assert (await admin.get("/api/v1/images/fw2")).body["results"] == UBOOT  # nothing lost
    assert (await admin.get("/api/v1/jobs")).body["jobs"] == before


@pytest_twisted.ensureDeferred
async def test_start_job_carries_the_patterns(switchboard: RunningSwitchboard) -> None:
    admin = switchboard.admin
    job = (await admin.post("/api/v1/jobs", {"image": DIGEST, "results": TOCK})).body
    found = await switchboard.store.job_start(job["id"])
    assert found["results"] == TOCK


@pytest_twisted.ensureDeferred
async def test_tml_sets_patterns_on_images_and_jobs(switchboard: RunningSwitchboard) -> None:
    import io

    from twisted.internet import reactor

    from treadmill.cli.main import run as tml

    async def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await tml(reactor, ["--url", switchboard.url, "--token", switchboard.admin_token,
                                   "--json", *args], out, err, {})
        return code, out.getvalue(), err.getvalue()

    await switchboard.register_store(STORE, "store")
    code, out, err = await run("image", "register", "fw", DIGEST, "--store", STORE,
                               "--results-pattern", "pass=^Failures: 0$",
                               "--results-pattern", "fail=^Failures: [1-9]")
    assert code == 0, err
    assert json.loads(out)["results"] == UBOOT
    code, out, err = await run("job", "submit", "fw", "--results-pattern", f"end={TOCK['end']}")
    assert code == 0, err
    job = (await switchboard.admin.get(f"/api/v1/jobs/{json.loads(out)['id']}")).body
    assert job["results"]["patterns"] == {"end": TOCK["end"]}
    code, out, err = await run("image", "update", "fw", "--no-results-patterns")
    assert code == 0 and json.loads(out)["results"] is None, err
    code, out, err = await run("job", "submit", "fw", "--results-pattern", "end=(a)\\1")
    assert code == 2 and "not an RE2 regular expression" in err, err
    code, out, err = await run("job", "submit", "fw", "--results-pattern", "end=a",
                               "--results-pattern", "end=b")
    assert code == 2 and "each KEY at most once" in err, err
