"""``tml job run`` and ``tml job wait`` against the fake switchboard: JSON output, the
wait timeout, artifacts that cannot be written."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.cli.conftest import ALICE_TOKEN


@pytest.fixture
def env(fake_switchboard, tmp_path):
    return {"HOME": str(tmp_path / "home"), "TREADMILL_URL": fake_switchboard.url,
            "TREADMILL_TOKEN": ALICE_TOKEN}


@pytest_twisted.ensureDeferred
async def test_job_run_json_lines_end_with_the_summary(tml, fake_switchboard, env, tmp_path):
    fake_switchboard.life(reason="workload_exited", exit_status=3, message="2 tests failed")
    r = await tml("job", "run", "debian", "--tag", "qemu", "--json",
                  "--artifacts", str(tmp_path / "out"), env=env)
    assert r.status == 4, r.err
    docs = [json.loads(line) for line in r.out.splitlines()]
    job, events, summary = docs[0], docs[1:-1], docs[-1]
    assert job["id"] in fake_switchboard.jobs
    assert [e["state"] for e in events] == ["queued", "assigned", "initializing", "ready",
                                            "terminated"]
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["job"], summary["reason"], summary["exit_status"],
            summary["tml_exit_status"], summary["message"]) == (
        job["id"], "workload_exited", 3, 4, "2 tests failed")
    assert summary["artifacts"] == {"console": None, "earlier_consoles": [],
                                    "events": "events.jsonl", "results": None,
                                    "summary": "summary.json"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["events.jsonl",
                                                                    "summary.json"]
    body = next(b for m, uri, b in fake_switchboard.requests if m == "POST")
    assert body["tags"] == ["qemu"]


@pytest_twisted.ensureDeferred
async def test_job_run_artifacts_that_cannot_be_written_exit_1(tml, fake_switchboard, env,
                                                               tmp_path):
    fake_switchboard.life(reason="workload_exited", exit_status=0)
    (tmp_path / "file").write_text("x")
    r = await tml("job", "run", "debian", "--artifacts", str(tmp_path / "file" / "out"),
                  env=env)
    assert r.status == 1
    assert r.err.splitlines()[-1] == (f"tml: error: --artifacts {tmp_path / 'file' / 'out'}: "
                                      "Not a directory")


@pytest_twisted.ensureDeferred
async def test_job_wait_timeout_exits_6_and_leaves_the_job(tml, fake_switchboard, env):
    fake_switchboard.life(reason="workload_exited", exit_status=0)
    fake_switchboard.plan(upto=2, close=False)
    job_id = "11111111-2222-4333-8444-555555555555"
    r = await tml("job", "wait", job_id, "--timeout", "0.3", env=env)
    assert r.status == 6, r.err
    assert r.err == f"tml: job {job_id} is still assigned after 0.3 s\n"
    assert r.out == ""
    assert not [uri for m, uri, _ in fake_switchboard.requests if "terminate" in uri]


def test_job_run_takes_every_option_of_job_submit() -> None:
    from tests.cli.support import commands
    from treadmill.cli.main import build_parser

    parsers = {path: parser for path, parser in commands(build_parser())}
    submit = {o for a in parsers[("job", "submit")]._actions for o in a.option_strings}
    run = {o for a in parsers[("job", "run")]._actions for o in a.option_strings}
    assert submit - run == {"--follow", "-f"}
    assert run - submit == {"--artifacts", "--keep-on-interrupt"}
