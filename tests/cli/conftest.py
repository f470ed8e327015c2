"""A small fake switchboard (a real HTTP server on 127.0.0.1) and a ``tml`` runner.

The fake implements just enough of ``docs/api.md`` for the CLI tests; the
lead's end-to-end tests run ``tml`` against the real switchboard.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.util.certs import make_pki
from treadmill.cli.main import run

NOW = "2026-11-23T17:00:00.123456Z"
ALICE_TOKEN = "tmt_alice_secret"
ROOT_TOKEN = "tmt_root_secret"


def event(seq: int, state: str, **extra: Any) -> dict[str, Any]:
    """An ``Event`` as the switchboard sends it."""
    return {
        "seq": seq,
        "job": "?",
        "at": NOW,
        "state": state,
        "stage": extra.get("stage"),
        "reason": extra.get("reason"),
        "exit_status": extra.get("exit_status"),
        "message": extra.get("message"),
    }


def terminated_run(seq0: int = 1, **termination: Any) -> list[dict[str, Any]]:
    """A job's whole life, ending with ``termination``."""
    return [
        event(seq0, "queued"),
        event(seq0 + 1, "assigned"),
        event(seq0 + 2, "initializing", stage="booting"),
        event(seq0 + 3, "ready"),
        event(seq0 + 4, "terminated", **termination),
    ]


@dataclass
class WatchPlan:
    """What one ``events/watch`` connection sends: events up to ``upto`` (all if
    None), split into ``chunk``-byte writes, then ``close`` or hang open."""

    upto: int | None = None
    close: bool = True
    chunk: int = 7


@dataclass
class Fault:
    """An answer the fake gives instead of handling a request (``times`` times; None:
    always)."""

    status: int = 503
    code: str = "unavailable"
    message: str = "the database is unavailable"
    retry_after: str | None = None
    times: int | None = 1


@dataclass
class FakeSwitchboard:
    """State and routes of the fake; tests read ``requests`` and set ``events``.

    ``faults["METHOD /api/v1/path"]`` lists :class:`Fault` answers given first;
    ``seen`` records every request as ``(time, "METHOD /path", Idempotency-Key)``.
    """

    url: str = ""
    ca_file: str = ""
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    plans: list[WatchPlan] = field(default_factory=list)
    published: int = 0
    requests: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    streams_closed_by_client: int = 0
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    seen: list[tuple[float, str, str | None]] = field(default_factory=list)
    log_tokens: list[str] = field(default_factory=list)
    log_servers: list[str] = field(default_factory=list)

    app = Klein()

    def fault(self, request: Request) -> bytes | None:
        """The injected answer for ``request``, if any (and record it)."""
        path = request.path.decode()
        key = request.getHeader(b"idempotency-key")
        self.seen.append((reactor.seconds(), f"{request.method.decode()} {path}",
                          key.decode() if key else None))
        faults = self.faults.get(f"{request.method.decode()} {path}")
        if not faults:
            return None
        fault = faults[0]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                faults.pop(0)
        if fault.retry_after is not None:
            request.setHeader(b"retry-after", fault.retry_after.encode())
        return self._error(request, fault.status, fault.code, fault.message)

    def count(self, what: str) -> int:
        """How many requests ``"METHOD /path"`` came."""
        return sum(1 for _, seen, _ in self.seen if seen == what)

    def __post_init__(self) -> None:
        self.users = {
            "alice": {"name": "alice", "admin": False, "disabled": False, "created_at": NOW},
            "root": {"name": "root", "admin": True, "disabled": False, "created_at": NOW},
        }
        self.tokens = {ALICE_TOKEN: "alice", ROOT_TOKEN: "root"}

    def life(self, **termination: Any) -> None:
        """Script a job's whole life, ending with ``termination``."""
        self.events = terminated_run(**termination)

    def plan(self, upto: int | None = None, close: bool = True, chunk: int = 7) -> None:
        """Script the next ``events/watch`` connection."""
        self.plans.append(WatchPlan(upto, close, chunk))

    # -- helpers

    def _json(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _error(self, request: Request, status: int, code: str, message: str) -> bytes:
        return self._json(request, status, {"error": {"code": code, "message": message}})

    def _user(self, request: Request) -> str | None:
        header = request.getHeader(b"authorization")
        self.auth_headers.append(header.decode() if header else None)
        if header and header.startswith(b"Bearer "):
            return self.tokens.get(header[7:].decode())
        return None

    def _body(self, request: Request) -> dict[str, Any] | None:
        raw = request.content.read()
        return json.loads(raw) if raw else None

    def _log(self, request: Request, body: dict[str, Any] | None = None) -> None:
        self.requests.append((request.method.decode(), request.uri.decode(), body))

    def _new_token(self, user: str, label: str | None) -> dict[str, Any]:
        secret = f"tmt_{uuid.uuid4().hex}"
        self.tokens[secret] = user
        return {
            "id": str(uuid.uuid4()),
            "user": user,
            "label": label,
            "created_at": NOW,
            "expires_at": "2026-12-23T17:00:00.123456Z",
            "last_used_at": None,
            "revoked_at": None,
            "token": secret,
        }

    # -- routes

    @app.route("/api/v1/login", methods=["POST"])
    def login(self, request: Request) -> bytes:
        body = self._body(request) or {}
        self._log(request, {**body, "password": "***"})
        if body.get("user") != "alice" or body.get("password") != "pw":
            return self._error(request, 401, "unauthenticated", "wrong user or password")
        return self._json(request, 201, self._new_token("alice", body.get("label")))

    @app.route("/api/v1/whoami", methods=["GET"])
    def whoami(self, request: Request) -> bytes:
        self._log(request)
        user = self._user(request)
        if user is None:
            return self._error(request, 401, "unauthenticated", "missing or unknown token")
        return self._json(request, 200, self.users[user])

    @app.route("/api/v1/tokens", methods=["POST"])
    def create_token(self, request: Request) -> bytes:
        body = self._body(request) or {}
        self._log(request, body)
        user = self._user(request)
        if user is None:
            return self._error(request, 401, "unauthenticated", "missing or unknown token")
        target = body.get("user", user)
        if target != user and not self.users[user]["admin"]:
            message = "only admins may create tokens for others"
            return self._error(request, 403, "forbidden", message)
        return self._json(request, 201, self._new_token(target, body.get("label")))

    @app.route("/api/v1/hosts", methods=["POST"])
    def add_host(self, request: Request) -> bytes:
        body = self._body(request) or {}
        self._log(request, body)
        user = self._user(request)
        if user is None or not self.users[user]["admin"]:
            return self._error(request, 403, "forbidden", "admins only")
        host = {
            "name": body["name"],
            "tags": body.get("tags", []),
            "owner": body.get("owner"),
            "description": body.get("description", ""),
            "enabled": True,
            "healthy": True,
            "consecutive_failures": 0,
            "connected": False,
            "last_seen_at": None,
            "current_job": None,
            "created_at": NOW,
            "token": "tmh_host_secret",
        }
        return self._json(request, 201, host)

    @app.route("/api/v1/<kind>/<path:ident>/grants/<user>/<privilege>", methods=["DELETE"])
    def revoke(self, request: Request, kind: str, ident: str, user: str, privilege: str) -> bytes:
        self._log(request)
        self._user(request)
        request.setResponseCode(204)
        return b""

    @app.route("/api/v1/jobs", methods=["POST"])
    def submit(self, request: Request) -> bytes:
        body = self._body(request) or {}
        self._log(request, body)
        user = self._user(request)
        if user is None:
            return self._error(request, 401, "unauthenticated", "missing or unknown token")
        if "image" not in body:
            return self._error(request, 400, "bad_request", "image: required")
        job_id = str(uuid.uuid4())
        job = {
            "id": job_id,
            "owner": user,
            "label": body.get("label"),
            "image": {"name": body["image"], "digest": "sha256:" + "ab" * 32, "stores": []},
            "tags": body.get("tags", []),
            "parameters": body.get("parameters", {}),
            "state": "queued",
            "stage": None,
            "host": None,
            "termination": None,
            "created_at": NOW,
        }
        self.jobs[job_id] = job
        return self._json(request, 201, job)

    @app.route("/api/v1/jobs", methods=["GET"])
    def list_jobs(self, request: Request) -> bytes:
        self._log(request)
        self._user(request)
        ids = sorted(self.jobs)
        cursor = request.args.get(b"cursor", [b"0"])[0].decode()
        limit = int(request.args.get(b"limit", [b"100"])[0])
        start = int(cursor)
        page = ids[start : start + limit]
        body: dict[str, Any] = {"jobs": [self.jobs[i] for i in page]}
        if start + limit < len(ids):
            body["next_cursor"] = str(start + limit)
        return self._json(request, 200, body)

    def job_as_of_events(self, job_id: str) -> dict[str, Any] | None:
        """A job (known, or made up from the scripted events) in the state the events
        published so far say."""
        job = self.jobs.get(job_id)
        if job is None and not self.events and not self.log_servers:
            return None
        job = dict(job or {"id": job_id, "owner": "alice", "state": "queued", "host": None,
                           "termination": None, "created_at": NOW, "logs": self.log_servers})
        for e in self.events:
            if e["seq"] > self.published:
                break
            job["state"], job["stage"] = e["state"], e.get("stage")
            if e["state"] == "assigned":
                job["assigned_at"], job["host"] = e["at"], "mock-1"
            if e["state"] == "terminated":
                job["terminated_at"] = e["at"]
                job["termination"] = {k: e.get(k) for k in ("reason", "exit_status", "message")}
        return job

    @app.route("/api/v1/jobs/<job_id>", methods=["GET"])
    def show_job(self, request: Request, job_id: str) -> bytes:
        self._log(request)
        self._user(request)
        job = self.job_as_of_events(job_id)
        if job is None:
            return self._error(request, 404, "not_found", "no such job")
        return self._json(request, 200, job)

    @app.route("/api/v1/jobs/<job_id>/events", methods=["GET"])
    def list_events(self, request: Request, job_id: str) -> bytes:
        self._log(request)
        after = int(request.args.get(b"after", [b"0"])[0])
        shown = [e for e in self.events if after < e["seq"] <= self.published]
        return self._json(request, 200, {"events": shown})

    @app.route("/api/v1/jobs/<job_id>/events/watch", methods=["GET"])
    async def watch(self, request: Request, job_id: str) -> None:
        self._log(request)
        if self._user(request) is None:
            request.write(self._error(request, 401, "unauthenticated", "no token"))
            return
        plan = self.plans.pop(0) if self.plans else WatchPlan()
        if not plan.close:
            request.notifyFinish().addErrback(self._client_closed)
        after = int(request.args.get(b"after", [b"0"])[0])
        upto = plan.upto if plan.upto is not None else max((e["seq"] for e in self.events),
                                                           default=0)
        self.published = max(self.published, upto)
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b": hello\n\n")
        text = b"".join(
            b"event: job\ndata: " + json.dumps(e).encode() + b"\r\n\r\n"
            for e in self.events
            if after < e["seq"] <= upto
        )
        for i in range(0, len(text), plan.chunk):
            request.write(text[i : i + plan.chunk])
            await deferLater(reactor, 0.001, lambda: None)
        if not plan.close:
            await Deferred()  # until the client goes away (klein cancels it)

    def _client_closed(self, _: object) -> None:
        self.streams_closed_by_client += 1

    @app.route("/api/v1/jobs/<job_id>/logs/token", methods=["POST"])
    def logs_token(self, request: Request, job_id: str) -> bytes:
        self._log(request)
        if self._user(request) is None:
            return self._error(request, 401, "unauthenticated", "missing or unknown token")
        token = f"tml_log_{len(self.log_tokens)}"
        self.log_tokens.append(token)
        return self._json(request, 200, {"servers": self.log_servers, "token": token,
                                         "streams": ["console", "events"]})

    @app.route("/broken/api/v1/whoami", methods=["GET"])
    def broken(self, request: Request) -> bytes:
        request.setResponseCode(502)
        return b"<html>bad gateway</html>"


@dataclass
class Result:
    """What a ``tml`` run produced."""

    status: int
    out: str
    err: str


Tml = Callable[..., Awaitable[Result]]


@pytest_twisted.async_yield_fixture
async def fake_switchboard():
    """A fake switchboard listening on a loopback port."""
    fake = FakeSwitchboard()
    port = reactor.listenTCP(0, Site(Faulty(fake)), interface="127.0.0.1")
    fake.url = f"http://127.0.0.1:{port.getHost().port}"
    yield fake
    await port.stopListening()


class Faulty(Resource):
    """The fake's routes, behind its injected faults."""

    isLeaf = True

    def __init__(self, fake: FakeSwitchboard):
        super().__init__()
        self.fake = fake
        self.routes = fake.app.resource()

    def render(self, request: Request) -> Any:
        answer = self.fake.fault(request)
        return answer if answer is not None else self.routes.render(request)


@pytest.fixture
def tml(tmp_path) -> Tml:
    """Run ``tml`` in-process; ``env`` defaults to an empty home in ``tmp_path``."""

    async def call(*argv: str, env: dict[str, str] | None = None, stdin: str = "") -> Result:
        out, err = io.StringIO(), io.StringIO()
        if env is None:
            env = {"HOME": str(tmp_path / "home")}
        d: Deferred[int] = run(reactor, list(argv), out, err, env, stdin=io.StringIO(stdin))
        status = await d
        return Result(status, out.getvalue(), err.getvalue())

    return call


@pytest_twisted.async_yield_fixture
async def tls_switchboard(tmp_path):
    """The fake switchboard over HTTPS with a private CA; ``fake.ca_file`` trusts it."""
    from twisted.internet import ssl

    pki = make_pki(tmp_path, "tml")
    fake = FakeSwitchboard()
    server_pem = pki["key"].read_bytes() + pki["cert"].read_bytes()
    options = ssl.PrivateCertificate.loadPEM(server_pem).options()
    port = reactor.listenSSL(0, Site(fake.app.resource()), options, interface="127.0.0.1")
    fake.url = f"https://127.0.0.1:{port.getHost().port}"
    fake.ca_file = str(pki["ca"])
    yield fake
    await port.stopListening()
