"""Bad input of every kind gets a clear 4xx error of the documented shape and
writes nothing; hostile strings that are valid round-trip exactly.

Most cases share one switchboard (a module fixture) and compare a snapshot of
every table, and of the API listings, before and after each request. Cases
that change authentication state or need a small body limit start their own.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
import treq
from psycopg2.extensions import make_dsn
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from tests.support import Client, Response, RunningSwitchboard, start_switchboard
from tests.util.waiting import sleep
from treadmill.dev.pgcluster import create_database, drop_database
from treadmill.switchboard import credentials

DIGEST = "sha256:" + "0123456789abcdef" * 4
MISSING_JOB = "6f1c1a34-5b0e-4c47-9d0c-0d7b8e2b9a11"
DAY = 24 * 3600


def assert_error(r: Response, status: int, code: str, *mentions: str) -> str:
    """``r`` is the documented error shape with ``status`` and ``code``; return the message."""
    assert r.status == status, (r.status, r.body)
    assert isinstance(r.body, dict) and set(r.body) == {"error"}, r.body
    assert set(r.body["error"]) == {"code", "message"}, r.body
    assert r.body["error"]["code"] == code, r.body
    message = r.body["error"]["message"]
    assert isinstance(message, str) and message, r.body
    for mention in mentions:
        assert mention in message, (mention, message)
    assert r.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return message


# The whole durable state, minus what legitimately changes on reads
# (api_tokens.last_used_at is batched in the background).
SNAPSHOT_QUERIES = {
    "users": "SELECT * FROM users ORDER BY id",
    "api_tokens": "SELECT id, user_id, token_hash, label, created_at, expires_at, revoked_at "
                  "FROM api_tokens ORDER BY id",
    "hosts": "SELECT * FROM hosts ORDER BY id",
    "images": "SELECT * FROM images ORDER BY id",
    "jobs": "SELECT * FROM jobs ORDER BY seq",
    "job_events": "SELECT * FROM job_events ORDER BY job_id, seq",
    "grants": "SELECT * FROM grants ORDER BY id",
}


async def snapshot(sb: RunningSwitchboard) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for table, sql in SNAPSHOT_QUERIES.items():
        state[table] = await sb.store.pool.fetchall(sql)
    for path in ("/api/v1/users", "/api/v1/hosts", "/api/v1/images", "/api/v1/jobs"):
        r = await sb.admin.get(path)
        assert r.status == 200, r.body
        state[path] = r.body
    return state


@dataclass
class World:
    sb: RunningSwitchboard
    alice: Client
    bob: Client
    job: str
    alice_token_id: str
    anonymous: Client = field(init=False)

    def __post_init__(self) -> None:
        self.anonymous = Client(self.sb.url)

    def client(self, who: str) -> Client:
        return {"admin": self.sb.admin, "alice": self.alice, "bob": self.bob,
                "anonymous": self.anonymous}[who]


async def populate(sb: RunningSwitchboard) -> World:
    alice = await sb.user("alice")
    bob = await sb.user("bob")
    r = await sb.admin.post("/api/v1/hosts", {"name": "h1", "tags": ["qemu"], "owner": "alice"})
    assert r.status == 201, r.body
    await sb.register_store("https://store.example", "store")
    await sb.register_store("https://s.example/o'brien", "s")
    r = await alice.post("/api/v1/images", {"name": "alice/img", "digest": DIGEST,
                                            "stores": ["https://store.example/"]})
    assert r.status == 201, r.body
    r = await alice.post("/api/v1/jobs", {"image": "alice/img", "label": "existing"})
    assert r.status == 201, r.body
    job = r.body["id"]
    r = await alice.post(f"/api/v1/jobs/{job}/grants", {"user": "bob", "privilege": "read"})
    assert r.status == 201, r.body
    # A terminated job never changes again, so no background service (timeouts,
    # a scheduler expiring unrunnable jobs) can touch the state between snapshots.
    r = await alice.post(f"/api/v1/jobs/{job}/terminate")
    assert r.status == 200 and r.body["state"] == "terminated", r.body
    tokens = (await alice.get("/api/v1/tokens")).body["tokens"]
    return World(sb, alice, bob, job, tokens[0]["id"])


@pytest_twisted.async_yield_fixture(scope="module")
async def world(pg_admin_dsn, tmp_path_factory):
    name = f"treadmill_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    sb = await start_switchboard(make_dsn(pg_admin_dsn, dbname=name),
                                 tmp_path_factory.mktemp("switchboard"))
    try:
        yield await populate(sb)
    finally:
        await sb.stop()
        drop_database(pg_admin_dsn, name)


@pytest_twisted.async_yield_fixture
async def own(switchboard):
    """A switchboard of this test's own, populated like ``world``."""
    yield await populate(switchboard)


async def rejected(world: World, who: str, method: str, path: str, body: Any = None, *,
                   raw: bytes | None = None, headers: dict[str, str] | None = None,
                   status: int, code: str, mentions: tuple[str, ...] = ()) -> str:
    """Send a bad request; check the error and that nothing was written."""
    before = await snapshot(world.sb)
    path = path.format(job=world.job)
    r = await world.client(who).request(method, path, body, raw=raw, headers=headers)
    message = assert_error(r, status, code, *mentions)
    after = await snapshot(world.sb)
    assert after == before, "a rejected request changed the state"
    return message


@dataclass
class Case:
    id: str
    method: str
    path: str
    body: Any = None
    raw: bytes | None = None
    status: int = 400
    mentions: tuple[str, ...] = ()
    who: str = "admin"
    headers: dict[str, str] | None = None

    @property
    def code(self) -> str:
        return {400: "bad_request", 401: "unauthenticated", 403: "forbidden",
                404: "not_found", 405: "method_not_allowed", 409: "conflict",
                413: "too_large", 415: "unsupported_media_type"}[self.status]


async def check(world: World, case: Case) -> None:
    """Send ``case``'s request; check its error and that nothing was written."""
    await rejected(world, case.who, case.method, case.path, case.body, raw=case.raw,
                   headers=case.headers, status=case.status, code=case.code,
                   mentions=case.mentions)


def run_cases(cases: list[Case]) -> Any:
    @pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])
    @pytest_twisted.ensureDeferred
    async def test(world, case: Case) -> None:
        await check(world, case)
    return test


def job(**fields: Any) -> dict[str, Any]:
    return {"image": DIGEST, **fields}


# -- malformed bodies ------------------------------------------------------------------

test_malformed_bodies = run_cases([
    Case("truncated-json", "POST", "/api/v1/users", raw=b'{"name": "x"', mentions=("JSON",)),
    Case("trailing-garbage", "POST", "/api/v1/users", raw=b'{"name": "x"} junk',
         mentions=("JSON",)),
    Case("single-quotes", "POST", "/api/v1/users", raw=b"{'name': 'x'}", mentions=("JSON",)),
    Case("not-utf8", "POST", "/api/v1/users", raw=b'{"name": "\xff\xfe"}',
         mentions=("JSON",)),
    Case("empty-body", "POST", "/api/v1/users", raw=b""),
    Case("whitespace-body", "POST", "/api/v1/jobs", raw=b"  \n "),
    Case("array", "POST", "/api/v1/users", raw=b'[{"name": "x"}]', mentions=("object",)),
    Case("string", "POST", "/api/v1/users", raw=b'"x"', mentions=("object",)),
    Case("number", "POST", "/api/v1/jobs", raw=b"42", mentions=("object",)),
    Case("null", "POST", "/api/v1/jobs", raw=b"null", mentions=("object",)),
    Case("array-as-job", "POST", "/api/v1/jobs", raw=b"[]", who="alice"),
    Case("string-as-grant", "POST", "/api/v1/jobs/{job}/grants", raw=b'"bob"', who="alice"),
])

# -- wrong types, unknown fields, missing fields --------------------------------------

test_wrong_types = run_cases([
    Case("user-name-number", "POST", "/api/v1/users", {"name": 5}, mentions=("name",)),
    Case("user-admin-string", "POST", "/api/v1/users", {"name": "x", "admin": "yes"},
         mentions=("admin",)),
    Case("user-password-number", "POST", "/api/v1/users", {"name": "x", "password": 12345678},
         mentions=("password",)),
    Case("patch-disabled-string", "PATCH", "/api/v1/users/bob", {"disabled": "true"},
         mentions=("disabled",)),
    Case("host-tags-string", "POST", "/api/v1/hosts", {"name": "h2", "tags": "qemu"},
         mentions=("tags",)),
    Case("host-tag-number", "POST", "/api/v1/hosts", {"name": "h2", "tags": [1]},
         mentions=("tags",)),
    Case("host-owner-list", "POST", "/api/v1/hosts", {"name": "h2", "owner": ["alice"]},
         mentions=("owner",)),
    Case("put-tags-null", "PUT", "/api/v1/hosts/h1/tags", {"tags": None}, mentions=("tags",)),
    Case("image-stores-string", "POST", "/api/v1/images",
         {"name": "i2", "digest": DIGEST, "stores": "https://s.example/"},
         mentions=("stores",)),
    Case("image-digest-number", "POST", "/api/v1/images",
         {"name": "i2", "digest": 256, "stores": []}, mentions=("digest",)),
    Case("job-image-number", "POST", "/api/v1/jobs", {"image": 1}, mentions=("image",)),
    Case("job-timeout-string", "POST", "/api/v1/jobs", job(timeout="60"),
         mentions=("timeout",)),
    Case("job-timeout-bool", "POST", "/api/v1/jobs", job(timeout=True),
         mentions=("timeout",)),
    Case("job-queue-timeout-null", "POST", "/api/v1/jobs", job(queue_timeout=None),
         mentions=("queue_timeout",)),
    Case("job-max-restarts-float", "POST", "/api/v1/jobs", job(max_restarts=1.5),
         mentions=("max_restarts",)),
    Case("job-max-restarts-bool", "POST", "/api/v1/jobs", job(max_restarts=True),
         mentions=("max_restarts",)),
    Case("job-tags-object", "POST", "/api/v1/jobs", job(tags={"a": "b"}), mentions=("tags",)),
    Case("job-parameters-list", "POST", "/api/v1/jobs", job(parameters=["A=1"]),
         mentions=("parameters",)),
    Case("job-parameter-bare-string", "POST", "/api/v1/jobs", job(parameters={"A": "1"}),
         mentions=("parameters",)),
    Case("job-parameter-value-number", "POST", "/api/v1/jobs",
         job(parameters={"A": {"value": 1}}), mentions=("parameters.A.value",)),
    Case("job-parameter-secret-string", "POST", "/api/v1/jobs",
         job(parameters={"A": {"value": "1", "secret": "yes"}}),
         mentions=("parameters.A.secret",)),
    Case("job-label-number", "POST", "/api/v1/jobs", job(label=42), mentions=("label",)),
    Case("token-expires-string", "POST", "/api/v1/tokens", {"expires_in": "1h"},
         mentions=("expires_in",)),
    Case("grant-user-number", "POST", "/api/v1/jobs/{job}/grants",
         {"user": 7, "privilege": "read"}, mentions=("user",)),
    Case("login-password-number", "POST", "/api/v1/login", {"user": "alice", "password": 1},
         who="anonymous", mentions=("password",)),
])

test_unknown_fields = run_cases([
    Case("user", "POST", "/api/v1/users", {"name": "x", "superuser": True},
         mentions=("superuser",)),
    Case("user-patch", "PATCH", "/api/v1/users/bob", {"name": "robert"}, mentions=("name",)),
    Case("host", "POST", "/api/v1/hosts", {"name": "h2", "token": "mine"},
         mentions=("token",)),
    Case("image", "POST", "/api/v1/images",
         {"name": "i2", "digest": DIGEST, "stores": [], "public": True},
         mentions=("public",)),
    Case("job", "POST", "/api/v1/jobs", job(priority=10), mentions=("priority",)),
    Case("job-owner", "POST", "/api/v1/jobs", job(owner="alice"), who="bob",
         mentions=("owner",)),
    Case("job-parameter", "POST", "/api/v1/jobs",
         job(parameters={"A": {"value": "1", "hidden": True}}), mentions=("hidden",)),
    Case("token", "POST", "/api/v1/tokens", {"label": "x", "scope": "all"},
         mentions=("scope",)),
    Case("grant", "POST", "/api/v1/jobs/{job}/grants",
         {"user": "bob", "privilege": "stop", "until": "never"}, who="alice",
         mentions=("until",)),
])

test_missing_fields = run_cases([
    Case("user-name", "POST", "/api/v1/users", {"admin": True}, mentions=("name",)),
    Case("user-empty-object", "POST", "/api/v1/users", {}, mentions=("name",)),
    Case("host-name", "POST", "/api/v1/hosts", {"tags": []}, mentions=("name",)),
    Case("host-tags", "PUT", "/api/v1/hosts/h1/tags", {}, mentions=("tags",)),
    Case("image-digest", "POST", "/api/v1/images", {"name": "i2", "stores": []},
         mentions=("digest",)),
    Case("image-stores", "POST", "/api/v1/images", {"name": "i2", "digest": DIGEST},
         mentions=("stores",)),
    Case("job-image", "POST", "/api/v1/jobs", {"label": "no image"}, mentions=("image",)),
    Case("job-parameter-value", "POST", "/api/v1/jobs",
         job(parameters={"A": {"secret": True}}), mentions=("value",)),
    Case("grant-privilege", "POST", "/api/v1/jobs/{job}/grants", {"user": "bob"},
         who="alice", mentions=("privilege",)),
    Case("login-password", "POST", "/api/v1/login", {"user": "alice"}, who="anonymous",
         mentions=("password",)),
])

# -- media type and size -----------------------------------------------------------------

test_wrong_content_type = run_cases([
    Case("text-plain", "POST", "/api/v1/users", {"name": "x"}, status=415,
         headers={"content-type": "text/plain"}, mentions=("application/json",)),
    Case("form", "POST", "/api/v1/jobs", raw=b"image=" + DIGEST.encode(), status=415,
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("xml", "PUT", "/api/v1/hosts/h1/tags", raw=b"<tags/>", status=415,
         headers={"content-type": "application/xml"}),
    Case("multipart", "POST", "/api/v1/images",
         raw=(b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\ni2\r\n--x--\r\n'),
         status=415, headers={"content-type": "multipart/form-data; boundary=x"}),
])


@pytest_twisted.ensureDeferred
async def test_malformed_multipart_body(world):
    await rejected(world, "admin", "POST", "/api/v1/images", raw=b"--x--", status=415,
                   code="unsupported_media_type",
                   headers={"content-type": "multipart/form-data; boundary=x"})


@pytest_twisted.ensureDeferred
async def test_body_over_64_kib_is_refused_by_default(world):
    big = {"name": "x", "padding": "p" * (64 * 1024)}
    await rejected(world, "admin", "POST", "/api/v1/users", big, status=413, code="too_large")
    await rejected(world, "alice", "POST", "/api/v1/jobs",
                   job(label="x" * 70000), status=413, code="too_large")


# -- values out of range and hostile names -----------------------------------------------

BAD_NAMES = {
    "slash": "a/b",
    "dotdot": "..",
    "dot": ".",
    "dot-slash": "./x",
    "leading-dot": ".hidden",
    "backslash": "a\\b",
    "space": "a b",
    "leading-space": " a",
    "tab": "a\tb",
    "nul": "a\x00b",
    "bell": "a\x07",
    "escape": "a\x1b[31m",
    "newline-inside": "a\nb",
    "sql": "x'; DROP TABLE users; --",
    "quote": 'a"b',
    "percent": "a%20b",
    "long-1000": "a" * 1000,
    "long-64": "a" * 64,
    "empty": "",
    "leading-dash": "-rf",
    "unicode": "ålice",
    "colon": "a:b",
}

test_bad_user_names = run_cases([
    Case(f"user-{key}", "POST", "/api/v1/users", {"name": name}, mentions=("name",))
    for key, name in BAD_NAMES.items()])

test_bad_host_names = run_cases([
    Case(f"host-{key}", "POST", "/api/v1/hosts", {"name": name}, mentions=("name",))
    for key, name in BAD_NAMES.items()])

test_bad_image_names = run_cases([
    Case(f"image-{key}", "POST", "/api/v1/images",
         {"name": name, "digest": DIGEST, "stores": []}, mentions=("name",))
    for key, name in BAD_NAMES.items() if name not in ("a/b", "a" * 64)] + [
    Case(f"image-{key}", "POST", "/api/v1/images",
         {"name": name, "digest": DIGEST, "stores": []}, mentions=("name",))
    for key, name in {"absolute": "/etc/passwd", "traversal": "a/../b", "double-slash": "a//b",
                      "trailing-slash": "a/", "dot-segment": "a/./b",
                      "long-129": "a" * 129}.items()])

test_bad_names_elsewhere = run_cases([
    Case("host-owner-sql", "POST", "/api/v1/hosts", {"name": "h2", "owner": "x' OR '1'='1"},
         mentions=("owner",)),
    Case("token-user-traversal", "POST", "/api/v1/tokens", {"user": "../admin"},
         mentions=("user",)),
    Case("grant-user-sql", "POST", "/api/v1/jobs/{job}/grants",
         {"user": "*' OR 1=1 --", "privilege": "read"}, who="alice", mentions=("user",)),
    Case("login-user-sql", "POST", "/api/v1/login",
         {"user": "admin' --", "password": "whatever"}, who="anonymous", mentions=("user",)),
    Case("job-image-traversal", "POST", "/api/v1/jobs", {"image": "../../etc/passwd"},
         mentions=("image",)),
    Case("job-image-sql", "POST", "/api/v1/jobs", {"image": "x'; DROP TABLE jobs; --"},
         mentions=("image",)),
    Case("job-image-long", "POST", "/api/v1/jobs", {"image": "a" * 1000},
         mentions=("image",)),
])

BAD_DIGESTS = {
    "md5": "md5:" + "0" * 32,
    "sha512": "sha512:" + "0" * 128,
    "no-algorithm": "0123456789abcdef" * 4,
    "uppercase": "sha256:" + "0123456789ABCDEF" * 4,
    "uppercase-algorithm": "SHA256:" + "0123456789abcdef" * 4,
    "short": "sha256:" + "a" * 63,
    "long": "sha256:" + "a" * 65,
    "not-hex": "sha256:" + "g" * 64,
    "empty-hex": "sha256:",
    "space": "sha256: " + "a" * 64,
}

test_bad_digests = run_cases([
    Case(f"image-{key}", "POST", "/api/v1/images", {"name": "i2", "digest": d, "stores": []},
         mentions=("digest",)) for key, d in BAD_DIGESTS.items()] + [
    Case(f"image-update-{key}", "PUT", "/api/v1/images/alice/img", {"digest": d},
         mentions=("digest",)) for key, d in BAD_DIGESTS.items()] + [
    Case(f"job-{key}", "POST", "/api/v1/jobs", {"image": d}, mentions=("image",))
    for key, d in BAD_DIGESTS.items()])

test_bad_texts = run_cases([
    Case(f"{where}-{key}", "POST", path, body(text), mentions=(name,))
    for where, path, name, body in [
        ("job-label", "/api/v1/jobs", "label", lambda t: job(label=t)),
        ("host-description", "/api/v1/hosts", "description",
         lambda t: {"name": "h2", "description": t}),
        ("image-description", "/api/v1/images", "description",
         lambda t: {"name": "i2", "digest": DIGEST, "stores": [], "description": t}),
        ("token-label", "/api/v1/tokens", "label", lambda t: {"label": t}),
    ]
    for key, text in {"nul": "a\x00b", "newline": "line\nline", "cr": "a\rb", "tab": "a\tb",
                      "escape": "\x1b[2J\x1b[H", "del": "a\x7f", "bell": "\x07",
                      "long-257": "x" * 257,
                      # Not printable either (docs/api.md): a listing would show other text.
                      "bidi-override": "evil\u202etxt.exe", "zero-width": "a\u200bb",
                      "byte-order-mark": "\ufeffa", "private-use": "a\ue000",
                      "line-separator": "a\u2028b", "soft-hyphen": "a\xadb"}.items()])

test_bad_stores = run_cases([
    Case(f"store-{key}", "POST", "/api/v1/images",
         {"name": "i2", "digest": DIGEST, "stores": stores}, mentions=("stores",))
    for key, stores in {"ftp": ["ftp://s.example/"], "javascript": ["javascript:alert(1)"],
                        "file": ["file:///etc/passwd"], "no-host": ["http://"],
                        "space": ["http://s.example/a b"], "duplicate": ["http://a/", "http://a/"],
                        "too-many": [f"http://s{i}.example/" for i in range(17)],
                        "relative": ["/v2/"],
                        # Valid URLs, but no operator registered them.
                        "unregistered": ["https://evil.example/"],
                        "one-unregistered": ["https://store.example", "https://evil.example"],
                        "other-port": ["https://store.example:8443/"],
                        "other-prefix": ["https://store.example/other"],
                        "query": ["https://store.example/?x=1"]}.items()]
    + [Case("update-store-unregistered", "PUT", "/api/v1/images/alice/img",
            {"stores": ["https://evil.example/"]}, mentions=("stores", "registered"),
            who="alice")])

test_bad_store_registrations = run_cases([
    Case(f"register-{key}", "POST", "/api/v1/stores", body, mentions=mentions)
    for key, body, mentions in (
        ("ftp", {"url": "ftp://s.example", "service": "x"}, ("url",)),
        ("query", {"url": "https://s.example/?a=b", "service": "x"}, ("url",)),
        ("no-service", {"url": "https://s.example"}, ("service",)),
        ("bad-service", {"url": "https://s.example", "service": "a b"}, ("service",)),
        ("extra", {"url": "https://s.example", "service": "x", "admin": True}, ("admin",)),
    )] + [
    Case("register-url-taken", "POST", "/api/v1/stores",
         {"url": "https://STORE.example/", "service": "fresh"}, status=409),
    Case("register-service-taken", "POST", "/api/v1/stores",
         {"url": "https://fresh.example", "service": "store"}, status=409),
    Case("register-not-admin", "POST", "/api/v1/stores",
         {"url": "https://fresh.example", "service": "fresh"}, status=403, who="alice"),
    Case("unregister-unknown", "DELETE", "/api/v1/stores/nothing", status=404),
])

test_bad_job_values = run_cases([
    Case("timeout-above-max", "POST", "/api/v1/jobs", job(timeout=7 * DAY + 1),
         mentions=("timeout",)),
    Case("timeout-huge", "POST", "/api/v1/jobs", job(timeout=1e308), mentions=("timeout",)),
    Case("timeout-below-1", "POST", "/api/v1/jobs", job(timeout=0.5), mentions=("timeout",)),
    Case("timeout-zero", "POST", "/api/v1/jobs", job(timeout=0), mentions=("timeout",)),
    Case("timeout-negative", "POST", "/api/v1/jobs", job(timeout=-60), mentions=("timeout",)),
    Case("timeout-infinity", "POST", "/api/v1/jobs",
         raw=b'{"image": "' + DIGEST.encode() + b'", "timeout": Infinity}',
         mentions=("Infinity",)),  # Not JSON at all.
    Case("queue-timeout-above-max", "POST", "/api/v1/jobs", job(queue_timeout=30 * DAY + 1),
         mentions=("queue_timeout",)),
    Case("queue-timeout-below-1", "POST", "/api/v1/jobs", job(queue_timeout=0.999),
         mentions=("queue_timeout",)),
    Case("max-restarts-negative", "POST", "/api/v1/jobs", job(max_restarts=-1),
         mentions=("max_restarts",)),
    Case("max-restarts-huge", "POST", "/api/v1/jobs", job(max_restarts=10**9),
         mentions=("max_restarts",)),
    Case("parameter-value-nul", "POST", "/api/v1/jobs",
         job(parameters={"A": {"value": "abc\x00def"}}), mentions=("parameters.A.value",)),
    Case("secret-parameter-value-nul", "POST", "/api/v1/jobs",
         job(parameters={"A": {"value": "\x00", "secret": True}}), mentions=("parameters",)),
    Case("65-parameters", "POST", "/api/v1/jobs",
         job(parameters={f"P{i}": {"value": "v"} for i in range(65)}),
         mentions=("parameters",)),
    Case("parameter-value-4097", "POST", "/api/v1/jobs",
         job(parameters={"A": {"value": "v" * 4097}}), mentions=("parameters.A.value",)),
    Case("parameter-name-digit", "POST", "/api/v1/jobs",
         job(parameters={"1A": {"value": "v"}}), mentions=("parameters",)),
    Case("parameter-name-space", "POST", "/api/v1/jobs",
         job(parameters={"A B": {"value": "v"}}), mentions=("parameters",)),
    Case("parameter-name-empty", "POST", "/api/v1/jobs",
         job(parameters={"": {"value": "v"}}), mentions=("parameters",)),
    Case("parameter-name-long", "POST", "/api/v1/jobs",
         job(parameters={"A" * 65: {"value": "v"}}), mentions=("parameters",)),
    Case("tag-space", "POST", "/api/v1/jobs", job(tags=["arch = x86"]), mentions=("tags",)),
    Case("tag-duplicate", "POST", "/api/v1/jobs", job(tags=["qemu", "qemu"]),
         mentions=("tags",)),
    Case("tags-65", "POST", "/api/v1/jobs", job(tags=[f"t{i}" for i in range(65)]),
         mentions=("tags",)),
    Case("host-tags-control", "PUT", "/api/v1/hosts/h1/tags", {"tags": ["a\x00"]},
         mentions=("tags",)),
])

test_bad_identity_values = run_cases([
    Case("password-short", "POST", "/api/v1/users", {"name": "x", "password": "short"},
         mentions=("password",)),
    Case("password-long", "PATCH", "/api/v1/users/bob", {"password": "p" * 1025},
         mentions=("password",)),
    Case("expires-zero", "POST", "/api/v1/tokens", {"expires_in": 0},
         mentions=("expires_in",)),
    Case("expires-negative", "POST", "/api/v1/tokens", {"expires_in": -5},
         mentions=("expires_in",)),
    Case("expires-over-a-year", "POST", "/api/v1/tokens", {"expires_in": 366 * DAY},
         mentions=("expires_in",)),
    Case("expires-never-non-admin", "POST", "/api/v1/tokens", {"expires_in": None},
         who="alice", status=403),
    Case("other-users-token-non-admin", "POST", "/api/v1/tokens", {"user": "bob"},
         who="alice", status=403),
    Case("self-promotion", "PATCH", "/api/v1/users/alice", {"admin": True}, who="alice",
         status=403),
    Case("grant-privilege-unknown", "POST", "/api/v1/jobs/{job}/grants",
         {"user": "bob", "privilege": "owner"}, who="alice", mentions=("privilege",)),
    Case("grant-privilege-wrong-kind", "POST", "/api/v1/jobs/{job}/grants",
         {"user": "bob", "privilege": "use"}, who="alice", mentions=("privilege",)),
    Case("grant-host-privilege-wrong-kind", "POST", "/api/v1/hosts/h1/grants",
         {"user": "bob", "privilege": "stop"}, mentions=("privilege",)),
    Case("wrong-password", "POST", "/api/v1/login",
         {"user": "alice", "password": "not her password"}, who="anonymous", status=401),
    Case("login-unknown-user", "POST", "/api/v1/login",
         {"user": "nobody", "password": "whatever1"}, who="anonymous", status=401),
])

# -- unknown resources -----------------------------------------------------------------

test_not_found = run_cases([
    Case("job-unknown-uuid", "GET", f"/api/v1/jobs/{MISSING_JOB}", status=404),
    Case("job-not-uuid", "GET", "/api/v1/jobs/not-a-uuid", status=404),
    Case("job-sql-id", "GET", "/api/v1/jobs/" + quote("1' OR '1'='1"), status=404),
    Case("job-id-too-long", "GET", f"/api/v1/jobs/{MISSING_JOB}{MISSING_JOB}", status=404),
    Case("job-events-unknown", "GET", f"/api/v1/jobs/{MISSING_JOB}/events", status=404),
    Case("job-events-not-uuid", "GET", "/api/v1/jobs/12345/events", status=404),
    Case("job-watch-unknown", "GET", f"/api/v1/jobs/{MISSING_JOB}/events/watch", status=404),
    Case("job-watch-not-uuid", "GET", "/api/v1/jobs/x/events/watch", status=404),
    Case("job-terminate-unknown", "POST", f"/api/v1/jobs/{MISSING_JOB}/terminate",
         status=404),
    Case("job-terminate-not-uuid", "POST", "/api/v1/jobs/zzz/terminate", status=404),
    Case("job-grants-unknown", "GET", f"/api/v1/jobs/{MISSING_JOB}/grants", status=404),
    Case("user-unknown", "GET", "/api/v1/users/nobody", status=404),
    Case("user-patch-unknown", "PATCH", "/api/v1/users/nobody", {"disabled": True},
         status=404),
    Case("host-unknown", "GET", "/api/v1/hosts/nohost", status=404),
    Case("host-tags-unknown", "PUT", "/api/v1/hosts/nohost/tags", {"tags": []}, status=404),
    Case("host-drain-unknown", "POST", "/api/v1/hosts/nohost/drain", status=404),
    Case("host-enable-unknown", "POST", "/api/v1/hosts/nohost/enable", status=404),
    Case("host-token-unknown", "POST", "/api/v1/hosts/nohost/token", status=404),
    Case("host-delete-unknown", "DELETE", "/api/v1/hosts/nohost", status=404),
    Case("host-of-another-user", "GET", "/api/v1/hosts/h1", who="bob", status=404),
    Case("image-unknown", "GET", "/api/v1/images/noimage", status=404),
    Case("image-nested-unknown", "GET", "/api/v1/images/team/os/none", status=404),
    Case("image-update-unknown", "PUT", "/api/v1/images/noimage", {"description": "x"},
         status=404),
    Case("image-delete-unknown", "DELETE", "/api/v1/images/noimage", status=404),
    Case("image-of-another-user", "GET", "/api/v1/images/alice/img", who="bob", status=404),
    Case("token-unknown", "DELETE", f"/api/v1/tokens/{MISSING_JOB}", status=404),
    Case("token-not-uuid", "DELETE", "/api/v1/tokens/abc", status=404),
    Case("tokens-of-unknown-user", "GET", "/api/v1/tokens?user=nobody", status=404),
    Case("token-for-unknown-user", "POST", "/api/v1/tokens", {"user": "nobody"}, status=404),
    Case("host-owner-unknown", "POST", "/api/v1/hosts", {"name": "h2", "owner": "nobody"},
         status=404),
    Case("grant-to-unknown-user", "POST", "/api/v1/jobs/{job}/grants",
         {"user": "nobody", "privilege": "read"}, who="alice", status=404),
    Case("grant-revoke-unknown", "DELETE", "/api/v1/jobs/{job}/grants/bob/stop",
         who="alice", status=404),
    Case("grants-of-unknown-kind", "GET", "/api/v1/users/alice/grants", status=404),
    Case("unknown-endpoint", "GET", "/api/v1/nothing-here", status=404),
    Case("unknown-version", "GET", "/api/v2/jobs", status=404),
    Case("wrong-method", "DELETE", "/api/v1/jobs", status=405),
    Case("wrong-method-users", "PUT", "/api/v1/users", {"name": "x"}, status=405),
])


@pytest_twisted.ensureDeferred
async def test_not_found_for_resources_named_in_paths(world):
    """The few cases that need ids from the world, or a third user."""
    carol = await world.sb.user(f"carol-{uuid.uuid4().hex[:8]}")
    before = await snapshot(world.sb)
    for path in ("/api/v1/jobs/{job}", "/api/v1/jobs/{job}/events", "/api/v1/jobs/{job}/grants",
                 "/api/v1/jobs/{job}/events/watch"):
        r = await carol.get(path.format(job=world.job))
        assert_error(r, 404, "not_found")
    r = await carol.post(f"/api/v1/jobs/{world.job}/terminate")
    assert_error(r, 404, "not_found")
    r = await world.bob.delete(f"/api/v1/tokens/{world.alice_token_id}")
    assert_error(r, 404, "not_found")
    assert await snapshot(world.sb) == before


# -- query parameters ------------------------------------------------------------------

test_bad_query_parameters = run_cases([
    Case("cursor-garbage", "GET", "/api/v1/jobs?cursor=!!!garbage!!!", mentions=("cursor",)),
    Case("cursor-base64-not-ours", "GET", "/api/v1/jobs?cursor=aGVsbG8", mentions=("cursor",)),
    Case("cursor-j-not-number", "GET", "/api/v1/jobs?cursor=ang", mentions=("cursor",)),
    Case("cursor-not-utf8", "GET", "/api/v1/jobs?cursor=%FF%FE", mentions=("cursor",)),
    Case("cursor-unicode", "GET", "/api/v1/jobs?cursor=%E2%98%83", mentions=("cursor",)),
    Case("limit-zero", "GET", "/api/v1/jobs?limit=0", mentions=("limit",)),
    Case("limit-negative", "GET", "/api/v1/jobs?limit=-1", mentions=("limit",)),
    Case("limit-501", "GET", "/api/v1/jobs?limit=501", mentions=("limit",)),
    Case("limit-huge", "GET", "/api/v1/jobs?limit=99999999999999999999", mentions=("limit",)),
    Case("limit-word", "GET", "/api/v1/jobs?limit=ten", mentions=("limit",)),
    Case("limit-float", "GET", "/api/v1/jobs?limit=2.5", mentions=("limit",)),
    Case("limit-empty", "GET", "/api/v1/jobs?limit=", mentions=("limit",)),
    Case("state-unknown", "GET", "/api/v1/jobs?state=running", mentions=("state",)),
    Case("state-uppercase", "GET", "/api/v1/jobs?state=QUEUED", mentions=("state",)),
    Case("state-one-bad-of-two", "GET", "/api/v1/jobs?state=queued,bogus",
         mentions=("state",)),
    Case("state-empty", "GET", "/api/v1/jobs?state=", mentions=("state",)),
    Case("state-sql", "GET", "/api/v1/jobs?state=" + quote("queued' OR '1'='1"),
         mentions=("state",)),
    Case("owner-not-utf8", "GET", "/api/v1/jobs?owner=%FF", mentions=("owner",)),
    # The OpenAPI document's pattern for a user name: not an empty page.
    Case("owner-too-long", "GET", "/api/v1/jobs?owner=" + "a" * 64, mentions=("owner",)),
    Case("owner-bad-first", "GET", "/api/v1/jobs?owner=-alice", mentions=("owner",)),
    Case("owner-empty", "GET", "/api/v1/jobs?owner=", mentions=("owner",)),
    Case("events-after-negative", "GET", "/api/v1/jobs/{job}/events?after=-1",
         mentions=("after",)),
    Case("events-after-word", "GET", "/api/v1/jobs/{job}/events?after=first",
         mentions=("after",)),
    Case("events-after-huge", "GET", "/api/v1/jobs/{job}/events?after=4294967296",
         mentions=("after",)),
    Case("watch-after-word", "GET", "/api/v1/jobs/{job}/events/watch?after=x",
         mentions=("after",)),
])


@pytest_twisted.ensureDeferred
async def test_state_filter_not_utf8(world):
    await rejected(world, "admin", "GET", "/api/v1/jobs?state=%FF", status=400,
                   code="bad_request", mentions=("state",))


# -- authentication -------------------------------------------------------------------

BAD_AUTHORIZATION = {
    "missing": None,
    "empty": "",
    "scheme-only": "Bearer",
    "basic": "Basic YWRtaW46YWRtaW4=",
    "garbage": "Bearer garbage",
    "three-parts": "Bearer tmu_a tmu_b",
    "wrong-prefix": "Bearer tmx_" + "A" * 43,
    "unknown-token": "Bearer " + credentials.new_token(credentials.USER_TOKEN_PREFIX),
    "host-token-shape": "Bearer " + credentials.new_token(credentials.HOST_TOKEN_PREFIX),
    "too-long": "Bearer tmu_" + "A" * 500,
    "sql": "Bearer tmu_' OR '1'='1' --aaaaaaaaaaaa",
}


@pytest.mark.parametrize("key", list(BAD_AUTHORIZATION))
@pytest_twisted.ensureDeferred
async def test_bad_authorization_header(world, key):
    value = BAD_AUTHORIZATION[key]
    headers = {"content-type": "application/json"}
    if value is not None:
        headers["authorization"] = value
    before = await snapshot(world.sb)
    for method, path, body in [("GET", "/api/v1/whoami", None), ("GET", "/api/v1/jobs", None),
                               ("POST", "/api/v1/jobs", json.dumps(job()).encode()),
                               ("POST", "/api/v1/users", b'{"name": "intruder"}')]:
        response = await treq.request(method, world.sb.url + path, data=body, headers=headers)
        parsed = json.loads(await response.content())
        assert_error(Response(response.code, parsed, response.headers), 401, "unauthenticated")
        challenge = response.headers.getRawHeaders(b"www-authenticate")
        assert challenge and challenge[0].lower().startswith(b"bearer"), challenge
    assert await snapshot(world.sb) == before


@pytest_twisted.ensureDeferred
async def test_host_token_is_not_a_user_token(own):
    r = await own.sb.admin.post("/api/v1/hosts", {"name": "h2"})
    assert r.status == 201
    host_client = Client(own.sb.url, r.body["token"])
    assert_error(await host_client.get("/api/v1/whoami"), 401, "unauthenticated")


@pytest_twisted.ensureDeferred
async def test_expired_token(own):
    sb = own.sb
    row = await sb.store.get_user("alice")
    token = credentials.new_token(credentials.USER_TOKEN_PREFIX)
    await sb.store.create_token(row["id"], credentials.token_hash(token), "brief", 0.001)
    await sleep(0.05)
    client = Client(sb.url, token)
    before = await snapshot(sb)
    r = await client.get("/api/v1/whoami")
    assert_error(r, 401, "unauthenticated")
    assert r.headers.getRawHeaders(b"www-authenticate")
    assert_error(await client.post("/api/v1/jobs", job()), 401, "unauthenticated")
    assert_error(await client.post("/api/v1/tokens", {}), 401, "unauthenticated")
    assert await snapshot(sb) == before


@pytest_twisted.ensureDeferred
async def test_revoked_token_stops_at_once_despite_the_cache(own):
    sb = own.sb
    r = await own.alice.post("/api/v1/tokens", {"label": "ci"})
    assert r.status == 201, r.body
    ci = Client(sb.url, r.body["token"])
    token_id = r.body["id"]
    assert (await ci.get("/api/v1/whoami")).status == 200  # now cached

    # Bob may not revoke alice's token, and it keeps working.
    assert_error(await own.bob.delete(f"/api/v1/tokens/{token_id}"), 404, "not_found")
    assert (await ci.get("/api/v1/whoami")).status == 200

    r = await own.alice.delete(f"/api/v1/tokens/{token_id}")
    assert r.status == 200 and r.body["revoked_at"] is not None
    revoked_at = r.body["revoked_at"]
    r = await ci.get("/api/v1/whoami")
    assert_error(r, 401, "unauthenticated")
    assert r.headers.getRawHeaders(b"www-authenticate")
    assert_error(await ci.post("/api/v1/jobs", job()), 401, "unauthenticated")
    assert (await own.alice.get("/api/v1/whoami")).status == 200  # her other token
    # Revoking again changes nothing.
    again = await own.alice.delete(f"/api/v1/tokens/{token_id}")
    assert again.status == 200 and again.body["revoked_at"] == revoked_at


@pytest_twisted.ensureDeferred
async def test_revocation_by_another_instance_reaches_the_cache(own):
    """A revocation written straight to the database (as another switchboard
    instance would) clears this instance's cache through NOTIFY."""
    sb = own.sb
    r = await own.alice.post("/api/v1/tokens", {"label": "ci"})
    ci = Client(sb.url, r.body["token"])
    assert (await ci.get("/api/v1/whoami")).status == 200  # now cached
    await sb.store.revoke_token(r.body["id"])
    started = reactor.seconds()
    while True:
        status = (await ci.get("/api/v1/whoami")).status
        if status == 401 or reactor.seconds() - started > 2:
            break
        await sleep(0.02)
    assert status == 401
    assert reactor.seconds() - started < 1.0


@pytest_twisted.ensureDeferred
async def test_disabled_users_tokens_stop_at_once(own):
    sb = own.sb
    assert (await own.bob.get("/api/v1/whoami")).status == 200  # now cached
    r = await sb.admin.patch("/api/v1/users/bob", {"disabled": True})
    assert r.status == 200 and r.body["disabled"] is True
    r = await own.bob.get("/api/v1/whoami")
    assert_error(r, 401, "unauthenticated")
    assert r.headers.getRawHeaders(b"www-authenticate")
    assert_error(await own.bob.get(f"/api/v1/jobs/{own.job}"), 401, "unauthenticated")
    # Nor can a disabled user log in or get a token some other way.
    r = await sb.admin.patch("/api/v1/users/bob", {"password": "correct horse"})
    assert r.status == 200
    r = await own.anonymous.post("/api/v1/login", {"user": "bob", "password": "correct horse"})
    assert_error(r, 401, "unauthenticated")

    r = await sb.admin.patch("/api/v1/users/bob", {"disabled": False})
    assert r.status == 200
    assert (await own.bob.get("/api/v1/whoami")).status == 200


# -- oversized bodies --------------------------------------------------------------------


@implementer(IBodyProducer)
class ChunkedBody:
    """A body of unknown length, so that the client sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes, chunk: int = 256):
        self.chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    def startProducing(self, consumer: Any) -> Any:
        for chunk in self.chunks:
            consumer.write(chunk)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.async_yield_fixture
async def small(migrated_database, tmp_path):
    sb = await start_switchboard(migrated_database, tmp_path, max_body=1024)
    try:
        yield World(sb, await sb.user("alice"), await sb.user("bob"), MISSING_JOB, "")
    finally:
        await sb.stop()


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON of exactly ``size`` bytes (padded with spaces)."""
    data = json.dumps(body).encode()
    assert len(data) <= size
    return data[:-1] + b" " * (size - len(data)) + b"}"


async def send(sb: RunningSwitchboard, path: str, data: Any) -> Response:
    response = await treq.post(sb.url + path, data=data, headers=sb.admin.headers())
    content = await response.content()
    return Response(response.code, json.loads(content) if content else None, response.headers)


@pytest_twisted.ensureDeferred
async def test_body_over_max_body_with_content_length(small):
    sb = small.sb
    before = await snapshot(sb)
    r = await send(sb, "/api/v1/users", padded({"name": "big"}, 1025))
    assert_error(r, 413, "too_large", "1024")
    r = await send(sb, "/api/v1/jobs", padded(job(label="big"), 50_000))
    assert_error(r, 413, "too_large")
    assert await snapshot(sb) == before
    # The limit itself is allowed.
    r = await send(sb, "/api/v1/users", padded({"name": "exact"}, 1024))
    assert r.status == 201, r.body


@pytest_twisted.ensureDeferred
async def test_body_over_max_body_chunked(small):
    sb = small.sb
    before = await snapshot(sb)
    r = await send(sb, "/api/v1/users", ChunkedBody(padded({"name": "big"}, 1025)))
    assert_error(r, 413, "too_large")
    r = await send(sb, "/api/v1/jobs", ChunkedBody(padded(job(label="big"), 200_000), 4096))
    assert_error(r, 413, "too_large")
    assert await snapshot(sb) == before
    # A chunked body within the limit is read whole.
    r = await send(sb, "/api/v1/users", ChunkedBody(padded({"name": "chunked"}, 1000), 100))
    assert r.status == 201, r.body
    assert r.body["name"] == "chunked"


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_refused_before_its_media_type_or_content(small):
    sb = small.sb
    before = await snapshot(sb)
    response = await treq.post(sb.url + "/api/v1/users", data=b"x" * 5000,
                               headers=sb.admin.headers({"content-type": "text/plain"}))
    parsed = json.loads(await response.content())
    assert_error(Response(response.code, parsed, response.headers), 413, "too_large")
    assert await snapshot(sb) == before


# -- duplicates --------------------------------------------------------------------------


test_duplicates = run_cases([
    Case("user", "POST", "/api/v1/users", {"name": "alice"}, status=409, mentions=("alice",)),
    Case("user-admin", "POST", "/api/v1/users", {"name": "admin", "admin": True}, status=409),
    Case("host", "POST", "/api/v1/hosts", {"name": "h1", "tags": ["other"]}, status=409,
         mentions=("h1",)),
    Case("user-in-another-case", "POST", "/api/v1/users", {"name": "ALICE"}, status=409,
         mentions=("alice",)),
    Case("image", "POST", "/api/v1/images",
         {"name": "alice/img", "digest": "sha256:" + "f" * 64, "stores": []}, who="alice",
         status=409, mentions=("alice/img",)),
    Case("image-in-another-case", "POST", "/api/v1/images",
         {"name": "Alice/IMG", "digest": "sha256:" + "f" * 64, "stores": []}, who="alice",
         status=409, mentions=("alice/img",)),
    Case("grant", "POST", "/api/v1/jobs/{job}/grants", {"user": "bob", "privilege": "read"},
         who="alice", status=409),
])


# -- hostile strings that are valid --------------------------------------------------------

HOSTILE_LABEL = ("It's \"quoted\" — naïve café 日本語 🚀 <script>alert(1)</script> "
                 "\\ ' ; DROP TABLE jobs; -- %s %n {0} ${HOME} $(rm -rf /)")
HOSTILE_VALUE = ("line one\nline two\r\n\ttabbed \"q\" 'q' \\ \\n \u2028 \U0001F600 "
                 "'; DELETE FROM jobs; -- \x1b[31m red \x7f end")


@pytest_twisted.ensureDeferred
async def test_hostile_but_valid_strings_round_trip(world):
    alice = world.alice
    body = job(label=HOSTILE_LABEL, tags=["k=v/w:x+y", "Z.9_-"],
               parameters={"_x.y-z": {"value": HOSTILE_VALUE},
                           "S": {"value": HOSTILE_VALUE, "secret": True},
                           "EMPTY": {"value": ""}})
    r = await alice.post("/api/v1/jobs", body)
    assert r.status == 201, r.body
    job_id = r.body["id"]
    for got in (r.body, (await alice.get(f"/api/v1/jobs/{job_id}")).body):
        assert got["label"] == HOSTILE_LABEL
        assert got["tags"] == ["k=v/w:x+y", "Z.9_-"]
        assert got["parameters"] == {"_x.y-z": {"value": HOSTILE_VALUE, "secret": False},
                                     "S": {"secret": True},
                                     "EMPTY": {"value": "", "secret": False}}
    row = await world.sb.store.pool.fetchone(
        "SELECT label, parameters FROM jobs WHERE id = %s", (job_id,))
    assert row["label"] == HOSTILE_LABEL
    assert row["parameters"]["S"]["value"] == HOSTILE_VALUE
    listed = (await alice.get("/api/v1/jobs?limit=1")).body["jobs"][0]
    assert listed["id"] == job_id and listed["label"] == HOSTILE_LABEL

    description = "<b>bold</b> & \"quotes\" 'single' — ünïcødé ✓ %00 \\x00"
    r = await world.sb.admin.post("/api/v1/hosts", {"name": "O.Brien-_1", "description":
                                                    description, "owner": "alice"})
    assert r.status == 201, r.body
    r = await world.sb.admin.get("/api/v1/hosts/O.Brien-_1")
    assert r.body["description"] == description and r.body["owner"] == "alice"

    r = await alice.post("/api/v1/images", {"name": "alice/team.a/os-1_2/debian",
                                            "digest": DIGEST,
                                            "stores": ["https://s.example/o'brien/"],
                                            "description": description})
    assert r.status == 201, r.body
    r = await alice.get("/api/v1/images/alice/team.a/os-1_2/debian")
    assert r.status == 200
    assert r.body["description"] == description
    assert r.body["stores"] == ["https://s.example/o'brien"]  # the registered form

    r = await alice.post("/api/v1/tokens", {"label": HOSTILE_LABEL[:256]})
    assert r.status == 201 and r.body["label"] == HOSTILE_LABEL[:256]
    assert (await alice.post(f"/api/v1/jobs/{job_id}/terminate")).status == 200


@pytest_twisted.ensureDeferred
async def test_longest_valid_values_are_accepted(world):
    r = await world.sb.admin.post("/api/v1/users", {"name": "u" * 63})
    assert r.status == 201, r.body
    r = await world.alice.post("/api/v1/jobs", job(
        label="x" * 256, timeout=7 * DAY, queue_timeout=30 * DAY, max_restarts=100,
        tags=[f"t{i}" for i in range(64)],
        parameters={f"P{i}": {"value": "v" * 4096 if i == 0 else "v"} for i in range(64)}))
    assert r.status == 201, r.body
    assert r.body["timeout"] == 7 * DAY and len(r.body["parameters"]) == 64
    assert (await world.alice.post(f"/api/v1/jobs/{r.body['id']}/terminate")).status == 200
    r = await world.alice.post("/api/v1/jobs", job(timeout=1, queue_timeout=1))
    assert r.status == 201, r.body
    assert (await world.alice.post(f"/api/v1/jobs/{r.body['id']}/terminate")).status == 200


# -- product bugs ------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    Case("name-with-trailing-newline", "POST", "/api/v1/users", {"name": "mallory\n"},
         mentions=("name",)),
    Case("label-with-trailing-newline", "POST", "/api/v1/jobs", job(label="build 42\n"),
         mentions=("label",), who="alice"),
    Case("digest-with-trailing-newline", "POST", "/api/v1/images",
         {"name": "nl", "digest": DIGEST + "\n", "stores": []}, mentions=("digest",),
         who="alice"),
    Case("nan-is-not-json", "POST", "/api/v1/jobs",
         raw=b'{"image": "' + DIGEST.encode() + b'", "timeout": NaN}', who="alice"),
    Case("label-with-c1-control", "POST", "/api/v1/jobs", job(label="a\x9b2Jb"),
         mentions=("label",), who="alice"),
    Case("parameter-value-over-4-kib-of-utf8", "POST", "/api/v1/jobs",
         job(parameters={"A": {"value": "\U0001F600" * 4096}}),
         mentions=("parameters.A.value",), who="alice"),
], ids=lambda case: case.id)
@pytest_twisted.ensureDeferred
async def test_product_bugs(own, case: Case) -> None:
    """Inputs that once got through, each on a switchboard of its own."""
    await check(own, case)


@pytest_twisted.ensureDeferred
async def test_deeply_nested_json(world):
    await rejected(world, "admin", "POST", "/api/v1/users", raw=b"[" * 50_000, status=400,
                   code="bad_request")
