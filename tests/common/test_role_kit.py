"""The parts every role's tap and service share: ``makeService``'s end, the keys
child, request logging, query parameters and the fallback error handlers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.web.test.requesthelper import DummyRequest

from treadmill.common import daemon
from treadmill.common.daemon import RoleService, listeners, twistd_service, with_backlog
from treadmill.common.http import (
    ApiError,
    add_fallback_error_handlers,
    log_requests,
    query_arg,
    respond,
    respond_error,
    validate,
)
from treadmill.common.keys import attach_keys


class _Metrics:
    registry = object()


class _Role(RoleService):
    metrics = _Metrics()

    def namespace(self) -> dict[str, Any]:
        return {"role": self}


def test_twistd_service_sets_exit_on_failure_and_adds_operator_services(monkeypatch):
    calls = []
    monkeypatch.setattr(daemon, "add_operator_services",
                        lambda *args: calls.append(args))
    reactor, root, values = MemoryReactor(), _Role(), {"metrics.listen": []}
    assert twistd_service(reactor, root, values) is root
    assert root.exit_on_failure
    assert calls == [(reactor, root, values, {"role": root}, _Metrics.registry)]


class _Source(MultiService):
    def verifier(self, issuer: str, audience: str) -> tuple[str, str]:
        return issuer, audience


def test_attach_keys_names_the_child_and_defaults_the_issuer():
    root, source = MultiService(), _Source()
    keys, verifier = attach_keys(root, MemoryReactor(), {"auth.issuer": None}, "aud", source)
    assert keys is source and root.getServiceNamed("keys") is source
    assert verifier == ("treadmill", "aud")


class _Site:
    def __init__(self) -> None:
        self.logged: list[Any] = []

    def log(self, request: Any) -> None:
        self.logged.append(request)


@pytest.mark.parametrize("access_log", [True, False])
def test_log_requests_observes_every_request_and_logs_on_demand(access_log):
    site, seen = _Site(), []
    logged = site.logged
    log_requests(site, access_log, seen.append)  # type: ignore[arg-type]
    site.log("r1")
    assert seen == ["r1"] and logged == (["r1"] if access_log else [])


def test_query_arg():
    request = DummyRequest([b""])
    assert query_arg(request, "n") is None
    request.args = {b"n": [b"1", "é".encode()]}
    assert query_arg(request, "n") == "é"
    with pytest.raises(ApiError) as info:
        query_arg(request, "n", "ascii")
    assert (info.value.status, info.value.message) == (400, "n: not ASCII")


class _API:
    app = Klein()
    log = Logger()

    @app.route("/ok", methods=["GET"])
    def ok(self, request: Any) -> bytes:
        return respond(request, {"ok": True})

    @app.route("/boom")
    def boom(self, request: Any) -> bytes:
        raise KeyError("boom")

    @app.route("/refused")
    def refused(self, request: Any) -> bytes:
        raise ApiError(403, "no")

    @app.handle_errors(ApiError)
    def _api_error(self, request: Any, failure: Any) -> bytes:
        return respond_error(request, failure.value)

    add_fallback_error_handlers(app)


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/ok", 200, None),
    ("GET", "/refused", 403, "forbidden"),
    ("GET", "/nowhere", 404, "not_found"),
    ("POST", "/ok", 405, "method_not_allowed"),
    ("GET", "/boom", 500, "internal"),
])
def test_fallback_error_handlers(method, path, status, code):
    client = StubTreq(_API().app.resource())
    response = client.request(method, "http://example.org" + path).result
    body = json.loads(client.content(response).result)
    assert response.code == status
    assert code is None or body["error"]["code"] == code
    if status == 405:
        assert response.headers.getRawHeaders("allow") == ["GET, HEAD"]


@pytest.mark.parametrize("schema, value, message", [
    ({"type": "integer"}, 1.5, "body: expected an integer"),
    ({"type": "array"}, {}, "body: expected an array"),
    ({"type": "object"}, [], "body: expected an object"),
    ({"type": "number"}, "1", "body: expected a number"),
    ({"type": ["string", "null"]}, 1, "body: expected a string or a null"),
])
def test_validation_messages_read_well(schema, value, message):
    with pytest.raises(ApiError) as raised:
        validate(value, schema)
    assert (raised.value.status, raised.value.message) == (400, message)


def test_listeners_get_a_large_backlog() -> None:
    """Every role's listeners: Twisted's default backlog (50) dropped connections in a
    burst (3,000 clients took 33 s to connect to a switchboard)."""
    assert with_backlog("tcp:8090:interface=127.0.0.1") == \
        "tcp:8090:interface=127.0.0.1:backlog=1024"
    assert with_backlog("tcp:8090:backlog=50") == "tcp:8090:backlog=50"
    assert with_backlog("unix:/run/x.sock") == "unix:/run/x.sock"
    reactor = MemoryReactor()
    parent = listeners(reactor, ["tcp:8080:interface=127.0.0.1", "tcp6:8081:backlog=64",
                                 "unix:/run/x.sock"], object(), "api")  # type: ignore[arg-type]
    parent.startService()
    assert [(port, backlog) for port, _, backlog, _ in reactor.tcpServers] == \
        [(8080, 1024), (8081, 64)]
    assert [backlog for _, _, backlog, _, _ in reactor.unixServers] == [50]
    parent.stopService()
