"""Property-based fuzzing of every HTTP route of the switchboard, image store, log server
and proxy: whatever the method, path, query, headers and body, no answer is a 5xx.

Requests are raw bytes over loopback to real servers, built by hypothesis from each
Klein app's own URL map, with mostly valid credentials so that requests get past
authentication into the handlers. The budget is fixed and the search derandomized
(``FUZZ_EXAMPLES`` per role; raise ``TREADMILL_FUZZ_EXAMPLES`` to search longer), so a
run is short and reproducible. hypothesis shrinks a failure to a minimal request.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_from_bytes

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from tests.imagestore.support import start_cache, start_store
from tests.logserver.support import Keys as LogKeys
from tests.logserver.support import LogClient, start_logserver
from tests.proxy.support import Keys as ProxyKeys
from tests.proxy.support import start_proxy
from tests.support import start_switchboard
from tests.util.raw import raw_connect
from treadmill.imagestore.api import RegistryAPI
from treadmill.logserver.api import LogServerAPI
from treadmill.proxy.api import ProxyAPI
from treadmill.switchboard import schemas
from treadmill.switchboard.api import SwitchboardAPI
from treadmill.switchboard.auth import CSRF_HEADER, SESSION_COOKIE, csrf_token
from treadmill.switchboard.web import WebConsole

FUZZ_EXAMPLES = int(os.environ.get("TREADMILL_FUZZ_EXAMPLES", "60"))
ANSWER_TIMEOUT = 1.0  # long-lived answers (event streams, follows, WebSockets) are cut

FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much])

PLACEHOLDER = re.compile(r"<(?:([A-Za-z_]\w*)(?:\([^)]*\))?:)?([A-Za-z_]\w*)>")
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
TRICKY = ["", ".", "..", "%2F", "%2e%2e", "a/b", "a%2Fb", "x" * 300, "-1", "0", "1e308",
          "NaN", "null", "true", "[]", "{}", "%", "%zz", "caf\u00e9", "\u202e", "a\tb",
          "9" * 40, "00000000-0000-0000-0000-000000000000", "sha256:", "sha256:" + "0" * 64,
          "sha256:" + "g" * 64, "_manifests", "*", "+", " ", "%20"]
HEADERS = ["Range", "Content-Range", "If-None-Match", "If-Match", "Accept", "Last-Event-ID",
           "Idempotency-Key", "Docker-Content-Digest", "X-Forwarded-For", "Cookie",
           "Accept-Encoding", "Content-Encoding", "Transfer-Encoding", "Expect",
           "Sec-WebSocket-Protocol", "Treadmill-Protocol-Minor", "Origin"]
CONTENT_TYPES = ["application/json", "application/octet-stream",
                 "application/vnd.oci.image.manifest.v1+json",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "text/plain; charset=utf-8", "application/json; charset=latin-1", "*/*"]


@dataclass
class Surface:
    """One role's server and what a fuzzer should know about it."""

    port: int
    routes: list[tuple[str, list[str]]]
    auth: list[str | tuple[bytes, ...]]
    """``Authorization`` values, or whole header lines (a console session's cookies)."""
    values: dict[str, list[str]] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    bodies: list[tuple[str, re.Pattern[bytes], Any]] = field(default_factory=list)
    """(method, path pattern, strategy) of request bodies that follow a JSON Schema."""

    def body_for(self, method: str, path: bytes) -> Any:
        for want, pattern, strategy in self.bodies:
            if want == method and pattern.fullmatch(path.split(b"?")[0]):
                return strategy
        return None


def routes_of(app: Any) -> list[tuple[str, list[str]]]:
    return sorted((rule.rule, sorted(rule.methods or ())) for rule in app.url_map.iter_rules())


def _property_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                names.update(value)
            names |= _property_names(value)
    elif isinstance(node, list):
        for item in node:
            names |= _property_names(item)
    return names


# -- strategies -------------------------------------------------------------------------

def _encoded(text: str) -> bytes:
    return quote(text, safe="").encode("ascii")


tricky_segment = st.sampled_from(TRICKY).map(
    lambda s: s.encode("utf-8") if "%" in s else _encoded(s))
text_segment = st.text(max_size=20).map(_encoded)
binary_segment = st.binary(max_size=12).map(lambda b: quote_from_bytes(b, safe="").encode())
segment_text = st.one_of(tricky_segment, text_segment, text_segment, binary_segment)


def segment(known: list[str]) -> st.SearchStrategy[bytes]:
    if not known:
        return segment_text
    good = st.sampled_from(known).map(lambda s: s.encode("utf-8"))
    return st.one_of(good, good, good, good, tricky_segment, text_segment, binary_segment)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=30), st.sampled_from(TRICKY))


def json_value(keys: list[str]) -> st.SearchStrategy[Any]:
    key = st.one_of(st.sampled_from(keys), st.text(max_size=10)) if keys else st.text(
        max_size=10)
    return st.recursive(json_scalar, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=6)), max_leaves=12)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that mostly follow ``schema`` (the JSON Schema subset of schemas.py)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kinds = schema.get("type", "object")
    if isinstance(kinds, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kinds])
    if kinds == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 40)
        patterns = [schema["pattern"]] if "pattern" in schema else [
            a["pattern"] for a in schema.get("anyOf", []) if "pattern" in a]
        if not patterns:
            return st.text(min_size=low, max_size=min(high, 40))
        return st.one_of([st.from_regex(p, fullmatch=True) for p in patterns]).filter(
            lambda v: low <= len(v) <= high)
    if kinds in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**31)))
        high = schema.get("maximum", 2**31)
        values = st.integers(int(low), int(high))
        return values if kinds == "integer" else st.one_of(values, st.floats(
            low, high, allow_nan=False, exclude_min="exclusiveMinimum" in schema))
    if kinds == "boolean":
        return st.booleans()
    if kinds == "null":
        return st.none()
    if kinds == "array":
        items = st.lists(from_schema(schema.get("items", {"type": "string"})),
                         max_size=min(schema.get("maxItems", 4), 4))
        return items.map(lambda v: list(dict.fromkeys(map(json.dumps, v)))).map(
            lambda v: [json.loads(x) for x in v]) if schema.get("uniqueItems") else items
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    fixed = st.fixed_dictionaries(
        {k: from_schema(v) for k, v in properties.items() if k in required},
        optional={k: from_schema(v) for k, v in properties.items() if k not in required})
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        names = from_schema({"type": "string", **schema.get("propertyNames", {})})
        return st.tuples(fixed, st.dictionaries(names, from_schema(extra), max_size=3)).map(
            lambda pair: {**pair[1], **pair[0]})
    return fixed


def json_bodies() -> list[tuple[str, re.Pattern[bytes], Any]]:
    """The switchboard's request bodies, by method and path, from its OpenAPI document."""
    from treadmill.switchboard import openapi

    document = openapi.build()
    found = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            ref = operation.get("requestBody", {}).get("content", {}).get(
                "application/json", {}).get("schema", {}).get("$ref") if isinstance(
                operation, dict) else None
            if ref is None:
                continue
            schema = schemas.REQUEST_BODIES[ref.rsplit("/", 1)[1]]
            pattern = re.sub(r"\\\{[^}]+\\\}", "(?:.+)", re.escape(path))
            found.append((method.upper(), re.compile(pattern.encode()), from_schema(schema)))
    return found


DIMENSIONS = ["none", "path", "method", "query", "auth", "headers", "body", "all"]


@st.composite
def requests(draw: Any, surface: Surface) -> bytes:
    """A request that is well formed but in at most one dimension (or, rarely, in all):
    deep enough to pass authentication and validation, wild enough to break them."""
    dirty = draw(st.sampled_from(DIMENSIONS))

    def wild(dimension: str) -> bool:
        return dirty in (dimension, "all")

    template, methods = draw(st.sampled_from(surface.routes))
    path = PLACEHOLDER.sub(lambda m: "\0" + m.group(2) + "\0", template).encode("utf-8")
    built = b""
    for i, part in enumerate(path.split(b"\0")):
        if i % 2 == 0:
            built += part
            continue
        known = surface.values.get(part.decode(), [])
        if known and not wild("path"):
            built += draw(st.sampled_from(known)).encode("utf-8")
        else:
            built += draw(segment(known) if known else segment_text)
    method = draw(st.sampled_from(METHODS if wild("method") else methods))
    name = st.sampled_from(surface.queries or ["x"]).map(str.encode)
    number = st.integers(-5, 2**40).map(lambda i: str(i).encode())
    values = st.one_of(text_segment, number, tricky_segment, binary_segment) if wild(
        "query") else st.one_of(number, st.sampled_from([b"0", b"1", b"true", b"v1"]))
    query = draw(st.lists(st.tuples(st.one_of(name, segment_text) if wild("query") else name,
                                    values), max_size=3 if wild("query") else 1))
    if query:
        built += b"?" + b"&".join(k + b"=" + v for k, v in query)
    headers = [b"Host: 127.0.0.1", b"Connection: close"]
    auth = draw(st.one_of(
        st.none(), st.text(max_size=40).map(lambda t: "Bearer " + t),
        st.binary(max_size=30).map(lambda b: "Basic " + base64.b64encode(b).decode()),
        st.binary(max_size=20).map(lambda b: "Bearer " + b.decode("latin-1")),
        st.sampled_from(["Basic", "Bearer", "Negotiate abc", "Basic !!!"]),
    ) if wild("auth") else st.sampled_from(surface.auth))
    if isinstance(auth, tuple):
        headers.extend(auth)
    elif auth is not None:
        headers.append(b"Authorization: " + auth.encode("utf-8" if auth.isascii() else
                                                        "latin-1", "replace"))
    if wild("headers"):
        for header, value in draw(st.lists(st.tuples(st.sampled_from(HEADERS), st.one_of(
                st.sampled_from(TRICKY).map(str.encode), st.text(max_size=30).map(str.encode),
                st.binary(max_size=20))), min_size=1, max_size=3)):
            headers.append(header.encode() + b": " + value.replace(b"\r", b"").replace(
                b"\n", b""))
    shaped = surface.body_for(method, built)
    if shaped is not None and not wild("body"):
        body: bytes | None = json.dumps(draw(shaped)).encode()
        ctype: str | None = "application/json"
    else:
        body = draw(st.one_of(
            st.none(), json_value(surface.keys).map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=200), st.sampled_from([b"{", b"[]", b'"\\ud800"',
                                                      b'{"a": "\\u0000"}', b"null"])))
        ctype = draw(st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)))
    if body is not None:
        if ctype is not None:
            headers.append(b"Content-Type: " + ctype.encode())
        headers.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([method.encode() + b" " + built + b" HTTP/1.1", *headers, b"",
                         body or b""])


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``; what came back before the server closed (or the timeout cut it)."""
    proto = await raw_connect(port)
    proto.transport.write(raw)
    timer = reactor.callLater(ANSWER_TIMEOUT, proto.transport.abortConnection)
    data = await proto.closed
    if timer.active():
        timer.cancel()
    return data


async def check(surface: Surface, raw: bytes) -> None:
    answer = await exchange(surface.port, raw)
    if not answer:
        return  # cut by the timeout before a byte: a long poll, not an error
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert match is not None, answer[:200]
    status = int(match.group(1))
    assert status < 500, (status, answer[:600])


# -- the servers ---------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def switchboard_surface(migrated_database: str, tmp_path: Path) -> AsyncIterator[Surface]:
    sb = await start_switchboard(migrated_database, tmp_path)
    try:
        host = await sb.admin.post("/api/v1/hosts", {"name": "fuzz-host", "tags": ["mock"]})
        job = await sb.admin.post("/api/v1/jobs", {
            "image": {"digest": "sha256:" + "1" * 64, "stores": ["http://127.0.0.1:9"]},
            "tags": ["mock"]})
        job_id = job.body["id"] if job.status == 201 else str(uuid.uuid4())
        keys = sorted(_property_names(list(schemas.REQUEST_BODIES.values())))
        cookie = f"Cookie: {SESSION_COOKIE}={sb.admin_token}".encode()
        csrf = f"{CSRF_HEADER}: {csrf_token(sb.admin_token)}".encode()
        yield Surface(
            int(sb.url.rsplit(":", 1)[1]),
            routes_of(SwitchboardAPI.app) + routes_of(WebConsole.app),
            [f"Bearer {sb.admin_token}"] * 3 + [
                "Basic " + base64.b64encode(f"admin:{sb.admin_token}".encode()).decode(),
                # The web console's session: its cookie with and without the CSRF header.
                (cookie, csrf), (cookie, csrf), (cookie,), (cookie, csrf[:-1] + b"0")],
            values={"job_id": [job_id], "name": ["admin", "fuzz-host", "org/img", "mock"],
                    "kind": ["hosts", "tags", "job", "host"], "path": ["index.html", "x.js"],
                    "user": ["admin"], "host": ["fuzz-host"], "ident": ["admin", job_id],
                    "collection": ["jobs", "images", "hosts", "users"],
                    "token_id": [str(uuid.uuid4())], "snapshot_id": [str(uuid.uuid4())],
                    "grantee": ["admin", "*"], "privilege": ["read", "manage"]},
            queries=["state", "owner", "limit", "cursor", "after", "user", "service",
                     "scope"],
            keys=keys, bodies=json_bodies())
        assert host.status == 201
    finally:
        await sb.stop()


async def _image_surfaces(tmp_path: Path, cache: bool) -> AsyncIterator[Surface]:
    upstream = await start_store(tmp_path / "store", None)
    running = upstream
    try:
        digest, manifest = await upstream.registry.push_image("lab/fw", "v1", [b"layer" * 10])
        blob = manifest["layers"][0]["digest"]
        if cache:  # cache mode, its /cache routes, pulling through from the store
            running = await start_cache(tmp_path / "cache", None, [upstream.url])
        yield Surface(
            running.port, routes_of(RegistryAPI.app), ["Bearer anything"],
            values={"name": ["lab/fw", "lab/new"], "reference": ["v1", digest],
                    "digest": [blob, digest], "session": [str(uuid.uuid4())],
                    "lease_id": ["a-1"], "job_id": [str(uuid.uuid4())]},
            queries=["n", "last", "digest", "mount", "from"],
            keys=["digests", "repository", "lease", "holder", "ttl", "fetch", "wait",
                  "schemaVersion", "mediaType", "config", "layers", "target", "tag"])
    finally:
        if running is not upstream:
            await running.stop()
        await upstream.stop()


# (Not one parametrized fixture: pytest-twisted wraps a hypothesis test once per item,
# and a second item of the same function would nest the wrappers.)
@pytest_twisted.async_yield_fixture
async def imagestore_surface(tmp_path: Path) -> AsyncIterator[Surface]:
    async for surface in _image_surfaces(tmp_path, cache=False):
        yield surface


@pytest_twisted.async_yield_fixture
async def imagecache_surface(tmp_path: Path) -> AsyncIterator[Surface]:
    async for surface in _image_surfaces(tmp_path, cache=True):
        yield surface


@pytest_twisted.async_yield_fixture
async def logserver_surface(tmp_path: Path) -> AsyncIterator[Surface]:
    keys = LogKeys(tmp_path)
    running = await start_logserver(tmp_path / "logs", keys)
    try:
        job = str(uuid.uuid4())
        write = keys.token(job, "append")
        assert (await LogClient(running.url).append(job, "console", 0, b"hi", write)).code == 200
        yield Surface(
            int(running.url.rsplit(":", 1)[1]), routes_of(LogServerAPI.app),
            [f"Bearer {keys.token(job, 'append', 'read')}"],
            values={"job": [job], "stream": ["console", "events", "new"],
                    "rest": ["console/x", "a/b/c"]},
            queries=["offset", "close", "follow", "length", "from", "to"])
    finally:
        await running.stop()


@pytest_twisted.async_yield_fixture
async def proxy_surface(tmp_path: Path) -> AsyncIterator[Surface]:
    keys = ProxyKeys(tmp_path)
    running = await start_proxy(keys)
    try:
        job = str(uuid.uuid4())
        yield Surface(
            int(running.url.rsplit(":", 1)[1]), routes_of(ProxyAPI.app),
            [f"Bearer {keys.token(job)}", f"Bearer {keys.token(job, actions=('connect',))}"],
            values={"tunnel_id": [str(uuid.uuid4()), "t-1"]}, queries=["job", "token"])
    finally:
        await running.stop()


# -- the properties --------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_switchboard_routes_answer_no_5xx(switchboard_surface: Surface, data: Any) -> None:
    await check(switchboard_surface, data.draw(requests(switchboard_surface)))


@FUZZ_SETTINGS
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_imagestore_routes_answer_no_5xx(imagestore_surface: Surface, data: Any) -> None:
    await check(imagestore_surface, data.draw(requests(imagestore_surface)))


@FUZZ_SETTINGS
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_imagecache_routes_answer_no_5xx(imagecache_surface: Surface, data: Any) -> None:
    await check(imagecache_surface, data.draw(requests(imagecache_surface)))


@FUZZ_SETTINGS
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_logserver_routes_answer_no_5xx(logserver_surface: Surface, data: Any) -> None:
    await check(logserver_surface, data.draw(requests(logserver_surface)))


@FUZZ_SETTINGS
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_proxy_routes_answer_no_5xx(proxy_surface: Surface, data: Any) -> None:
    await check(proxy_surface, data.draw(requests(proxy_surface)))


def test_every_route_is_fuzzed() -> None:
    """The surfaces come from the apps' URL maps: a new route is fuzzed without a change
    here, and the known values name only real placeholders."""
    for app in (SwitchboardAPI.app, WebConsole.app, RegistryAPI.app, LogServerAPI.app,
                ProxyAPI.app):
        rules = routes_of(app)
        assert len(rules) >= 3
        for rule, methods in rules:
            assert methods, rule
    assert any(rule == "/api/v1/openapi.json" for rule, _ in routes_of(SwitchboardAPI.app))
