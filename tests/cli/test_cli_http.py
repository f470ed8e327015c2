"""``tml`` run in-process against a real HTTP server (the fake switchboard)."""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from tests.util.waiting import eventually
from treadmill.cli.commands import follow as follow_module

ALICE = "tmt_alice_secret"
ROOT = "tmt_root_secret"
J1 = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
def env(tmp_path, fake_switchboard):
    """An environment that points at the fake with alice's token."""
    return {
        "HOME": str(tmp_path / "home"),
        "TREADMILL_URL": fake_switchboard.url,
        "TREADMILL_TOKEN": ALICE,
    }


@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch):
    """Reconnect without waiting a second."""
    monkeypatch.setattr(follow_module, "deferLater", _fast_defer_later)


def _fast_defer_later(clock, delay, f):
    return deferLater(clock, min(delay, 0.01), f)


@pytest_twisted.ensureDeferred
async def test_whoami(tml, fake_switchboard, env):
    result = await tml("whoami", env=env)
    assert result.status == 0, result.err
    assert "name:" in result.out and "alice" in result.out
    assert f"url:        {fake_switchboard.url}" in result.out
    assert fake_switchboard.auth_headers == [f"Bearer {ALICE}"]
    assert ALICE not in result.out + result.err


@pytest_twisted.ensureDeferred
async def test_whoami_json_and_flags_override_env(tml, fake_switchboard, env):
    env = {**env, "TREADMILL_TOKEN": "wrong"}
    result = await tml("whoami", "--json", "--token", ROOT, env=env)
    assert result.status == 0, result.err
    assert json.loads(result.out) == fake_switchboard.users["root"]


@pytest_twisted.ensureDeferred
async def test_unauthenticated_without_token_hints_login(tml, fake_switchboard, tmp_path):
    result = await tml("whoami", "--url", fake_switchboard.url)
    assert result.status == 1
    assert result.err.startswith("tml: error: missing or unknown token")
    assert "tml login" in result.err
    assert result.out == ""


@pytest_twisted.ensureDeferred
async def test_error_shape_exits_1(tml, env):
    result = await tml("job", "show", "00000000-0000-0000-0000-000000000000", env=env)
    assert result.status == 1
    assert result.err == "tml: error: no such job\n"
    assert result.out == ""


@pytest_twisted.ensureDeferred
async def test_bad_request_message(tml, fake_switchboard, env):
    result = await tml("whoami", env={**env, "TREADMILL_URL": fake_switchboard.url + "/broken"})
    assert result.status == 1
    assert result.err == "tml: error: HTTP 502 Bad Gateway\n"


@pytest_twisted.ensureDeferred
async def test_connection_refused_exits_3(tml, tmp_path):
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    env = {"HOME": str(tmp_path), "TREADMILL_RETRY_FOR": "0",  # no retries (test_cli_retry)
           "TREADMILL_TOKEN": "x"}
    result = await tml("whoami", "--url", url, env=env)
    assert result.status == 3
    assert result.err == f"tml: error: cannot reach the switchboard at {url}: connection refused\n"


@pytest_twisted.ensureDeferred
async def test_login_writes_private_config(tml, fake_switchboard, tmp_path):
    cfg = tmp_path / "cfg" / "treadmill" / "tml.toml"
    env = {"HOME": str(tmp_path), "TREADMILL_CONFIG": str(cfg)}
    result = await tml(
        "login",
        "--url",
        fake_switchboard.url,
        "--user",
        "alice",
        "--password-stdin",
        "--label",
        "ci",
        env=env,
        stdin="pw\n",
    )
    assert result.status == 0, result.err
    # As docs/cli.md shows it: the expiry without its fraction of a second.
    assert re.fullmatch(
        rf"Logged in to {re.escape(fake_switchboard.url)} as alice; token [0-9a-f-]{{36}} "
        rf"saved in {re.escape(str(cfg))} \(expires 2026-12-23T17:00:00Z\)\.\n", result.out)
    assert fake_switchboard.requests[0] == (
        "POST",
        "/api/v1/login",
        {"user": "alice", "password": "***", "label": "ci"},
    )
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    data = tomllib.loads(cfg.read_text())
    assert data["url"] == fake_switchboard.url
    assert data["token"] in fake_switchboard.tokens
    assert data["token"] not in result.out + result.err
    assert os.listdir(cfg.parent) == ["tml.toml"]

    result = await tml("whoami", env=env)
    assert result.status == 0, result.err
    assert "alice" in result.out


@pytest_twisted.ensureDeferred
async def test_login_prompts(tml, fake_switchboard, tmp_path, monkeypatch):
    prompts = []
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or "pw")
    env = {"HOME": str(tmp_path), "TREADMILL_URL": fake_switchboard.url}
    result = await tml("login", env=env, stdin="alice\n")
    assert result.status == 0, result.err
    assert result.err == "User: "
    assert prompts == [f"Password for alice at {fake_switchboard.url}: "]
    assert fake_switchboard.requests[0][2]["label"].startswith("tml on ")
    assert (tmp_path / ".config" / "treadmill" / "tml.toml").exists()


@pytest_twisted.ensureDeferred
async def test_login_wrong_password(tml, fake_switchboard, tmp_path):
    env = {"HOME": str(tmp_path), "TREADMILL_URL": fake_switchboard.url}
    result = await tml("login", "--user", "alice", "--password-stdin", env=env, stdin="nope")
    assert result.status == 1
    assert result.err == "tml: error: wrong user or password\n"
    assert not (tmp_path / ".config").exists()


@pytest_twisted.ensureDeferred
async def test_token_create_shows_secret_once(tml, fake_switchboard, env):
    result = await tml("token", "create", "--label", "ci", "--expires-in", "2h", env=env)
    assert result.status == 0, result.err
    secret = [line for line in result.out.splitlines() if line.startswith("token:")]
    assert len(secret) == 1 and secret[0].split()[1] in fake_switchboard.tokens
    assert "not shown again" in result.err
    assert fake_switchboard.requests[-1][2] == {"label": "ci", "expires_in": 7200}


@pytest_twisted.ensureDeferred
async def test_admin_token_create_forbidden(tml, env):
    result = await tml("admin", "token", "create", "--user", "root", env=env)
    assert result.status == 1
    assert result.err == "tml: error: only admins may create tokens for others\n"


@pytest_twisted.ensureDeferred
async def test_admin_host_add_prints_token(tml, fake_switchboard, env):
    env = {**env, "TREADMILL_TOKEN": ROOT}
    result = await tml("admin", "host", "add", "qemu-1", "--tag", "qemu", "--tag", "kvm", env=env)
    assert result.status == 0, result.err
    assert "token:" in result.out and "tmh_host_secret" in result.out
    assert "tags:" in result.out and "qemu,kvm" in result.out
    assert fake_switchboard.requests[-1][2] == {"name": "qemu-1", "tags": ["qemu", "kvm"]}


@pytest_twisted.ensureDeferred
async def test_revoke_quotes_path(tml, fake_switchboard, env):
    result = await tml("revoke", "image", "team/base", "*", "use", env=env)
    assert result.status == 0, result.err
    path = "/api/v1/images/team%2Fbase/grants/*/use"
    assert fake_switchboard.requests[-1][:2] == ("DELETE", path)
    assert result.out == "revoked use on image team/base from *\n"


@pytest_twisted.ensureDeferred
async def test_job_submit_body(tml, fake_switchboard, env):
    env = {**env, "API_KEY": "s3cret"}
    result = await tml(
        "job",
        "submit",
        "debian",
        "--tag",
        "qemu",
        "--param",
        "A=1=2",
        "--secret-param",
        "API_KEY",
        "--timeout",
        "15m",
        "--max-restarts",
        "2",
        env=env,
    )
    assert result.status == 0, result.err
    (job_id,) = fake_switchboard.jobs
    assert result.out == f"{job_id}\n"
    assert fake_switchboard.requests[-1][2] == {
        "image": "debian",
        "tags": ["qemu"],
        "parameters": {
            "A": {"value": "1=2", "secret": False},
            "API_KEY": {"value": "s3cret", "secret": True},
        },
        "timeout": 900,
        "max_restarts": 2,
    }


@pytest.mark.parametrize(
    ("termination", "status"),
    [
        ({"reason": "workload_exited", "exit_status": 0}, 0),
        ({"reason": "workload_exited", "exit_status": 3}, 4),
        ({"reason": "user_terminated", "message": "cancelled"}, 5),
        ({"reason": "execution_timeout"}, 5),
    ],
)
@pytest_twisted.ensureDeferred
async def test_job_submit_follow(tml, fake_switchboard, env, termination, status):
    fake_switchboard.life(**termination)
    result = await tml("job", "submit", "debian", "--follow", env=env)
    assert result.status == status, result.err
    (job_id,) = fake_switchboard.jobs
    lines = result.out.splitlines()
    assert lines[0] == job_id
    assert [line.split()[1] for line in lines[1:]] == [
        "queued",
        "assigned",
        "initializing/booting",
        "ready",
        "terminated",
    ]
    assert termination["reason"] in lines[-1]
    assert f"tml: job {job_id} terminated: {termination['reason']}" in result.err


@pytest_twisted.ensureDeferred
async def test_follow_json_lines(tml, fake_switchboard, env):
    fake_switchboard.life(reason="workload_exited", exit_status=0)
    result = await tml("job", "submit", "debian", "-f", "--json", env=env)
    assert result.status == 0, result.err
    docs = [json.loads(line) for line in result.out.splitlines()]
    assert docs[0]["id"] in fake_switchboard.jobs
    assert docs[1:] == fake_switchboard.events
    assert result.err == ""


@pytest_twisted.ensureDeferred
async def test_follow_resumes_after_stream_ends_early(tml, fake_switchboard, env):
    fake_switchboard.life(reason="workload_exited", exit_status=0)
    fake_switchboard.plan(upto=2)
    fake_switchboard.plan(upto=2)
    fake_switchboard.plan()
    result = await tml("job", "events", J1, "--follow", env=env)
    assert result.status == 0, result.err
    assert len(result.out.splitlines()) == 5
    watches = [uri for method, uri, _ in fake_switchboard.requests if "/watch" in uri]
    assert watches == [
        f"/api/v1/jobs/{J1}/events/watch",
        f"/api/v1/jobs/{J1}/events/watch?after=2",
        f"/api/v1/jobs/{J1}/events/watch?after=2",
    ]


@pytest_twisted.ensureDeferred
async def test_follow_stops_at_terminated_even_if_stream_stays_open(tml, fake_switchboard, env):
    fake_switchboard.life(reason="workload_exited", exit_status=0)
    fake_switchboard.plan(close=False, chunk=1000)
    result = await tml("job", "events", J1, "-f", env=env)
    assert result.status == 0, result.err
    assert len(result.out.splitlines()) == 5
    await eventually(lambda: fake_switchboard.streams_closed_by_client)
    assert fake_switchboard.streams_closed_by_client == 1


@pytest_twisted.ensureDeferred
async def test_job_ls_all_follows_cursor(tml, fake_switchboard, env):
    for _ in range(5):
        assert (await tml("job", "submit", "debian", env=env)).status == 0
    result = await tml("job", "ls", "--limit", "2", env=env)
    assert result.status == 0
    assert len(result.out.splitlines()) == 3
    assert "--all" in result.err
    result = await tml("job", "ls", "--limit", "2", "--all", "--json", env=env)
    assert result.status == 0
    assert sorted(j["id"] for j in json.loads(result.out)["jobs"]) == sorted(fake_switchboard.jobs)


@pytest_twisted.ensureDeferred
async def test_job_events_table(tml, fake_switchboard, env):
    fake_switchboard.life(reason="workload_exited", exit_status=0)
    fake_switchboard.published = 5
    result = await tml("job", "events", J1, "--after", "3", env=env)
    assert result.status == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["SEQ", "AT", "STATE", "STAGE", "REASON", "EXIT", "MESSAGE"]
    assert lines[1].split()[:3] == ["4", "2026-11-23T17:00:00Z", "ready"]
    assert lines[2].split()[2:6] == ["terminated", "-", "workload_exited", "0"]


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_https_with_private_ca(tml, tls_switchboard):
    sb = tls_switchboard
    result = await tml("whoami", "--url", sb.url, "--token", ALICE, "--ca-file", sb.ca_file)
    assert result.status == 0, result.err
    assert "alice" in result.out


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_https_untrusted_certificate_exits_3(tml, tls_switchboard):
    sb = tls_switchboard
    result = await tml("whoami", "--url", sb.url, env={"TREADMILL_TOKEN": ALICE})
    assert result.status == 3
    assert result.err.startswith(f"tml: error: cannot reach the switchboard at {sb.url}: TLS")
    assert sb.requests == []


@pytest_twisted.ensureDeferred
async def test_missing_ca_file_exits_1(tml, tmp_path):
    missing = tmp_path / "nope.pem"
    result = await tml("whoami", "--url", "https://127.0.0.1:9", "--ca-file", str(missing))
    assert result.status == 1
    assert result.err.startswith("tml: error: CA file: ")
