"""docs/openapi.json against the code that generates it, the Klein routes and docs/api.md.

Pure and synchronous: nothing is served, no database is needed.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from treadmill.common.http import STATUS_CODES, ApiError, dumps, error_body
from treadmill.switchboard import openapi, schemas, views
from treadmill.switchboard.access import KIND_OF_COLLECTION
from treadmill.switchboard.api import SwitchboardAPI
from treadmill.switchboard.api.args import prefix_range

ROOT = Path(__file__).resolve().parents[2]
OPENAPI_JSON = ROOT / "docs" / "openapi.json"
API_MD = ROOT / "docs" / "api.md"

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
IGNORED_METHODS = {"HEAD", "OPTIONS"}  # Added by werkzeug, not part of the API.

# Endpoints that exist only to route other documented paths: image names may
# contain "/", so POST /api/v1/images/<path:name> just dispatches
# POST /api/v1/images/{name}/grants (GET and DELETE of the same rule serve the
# image itself as well as its grants).
DISPATCH_ONLY = {"post_image_path"}

GENERIC_GRANTS = "/api/v1/{collection}/{ident}/grants"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.build()


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): item[method]
            for path, item in document["paths"].items() for method in METHODS
            if method in item}


# -- (1) the committed file is the generated one ------------------------------------


def test_committed_document_is_generated(document):
    assert OPENAPI_JSON.exists(), "docs/openapi.json is missing: run tools/gen-openapi"
    committed = OPENAPI_JSON.read_text(encoding="utf-8")
    assert json.loads(committed) == json.loads(openapi.render(document)), (
        "docs/openapi.json differs from treadmill.switchboard.openapi.build(): "
        "run tools/gen-openapi")
    assert committed == openapi.render(document), (
        "docs/openapi.json is not formatted as generated: run tools/gen-openapi")


def test_build_returns_fresh_documents(document):
    again = openapi.build()
    assert again == document
    again["components"]["schemas"]["Login"]["properties"]["user"]["pattern"] = "x"
    assert schemas.LOGIN["properties"]["user"]["pattern"] == schemas.NAME_PATTERN
    assert openapi.build() == document


# -- (2) a valid OpenAPI 3.1 document ------------------------------------------------


def test_valid_with_openapi_spec_validator(document):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only local references are expected"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_document_basics(document):
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "Treadmill switchboard API"
    assert document["info"]["version"] == "1"
    scheme = document["components"]["securitySchemes"][openapi.SECURITY_SCHEME]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert document["security"] == [{openapi.SECURITY_SCHEME: []}]


def test_every_ref_resolves(document):
    refs = set(_refs(document))
    assert refs
    for ref in refs:
        _resolve(document, ref)


def test_every_schema_is_json_schema_2020_12(document):
    component_schemas = document["components"]["schemas"]
    for name, schema in schemas.REQUEST_BODIES.items():
        assert component_schemas[name] == schema, f"{name}: not the request schema verbatim"
    for name, schema in component_schemas.items():
        Draft202012Validator.check_schema(schema)
        assert name in schemas.REQUEST_BODIES or name in openapi.RESPONSE_SCHEMAS
    for (method, path), operation in operations(document).items():
        item = document["paths"][path]
        for parameter in item.get("parameters", []) + operation.get("parameters", []):
            Draft202012Validator.check_schema(parameter["schema"])
        for status, response in operation["responses"].items():
            if "$ref" in response:
                response = _resolve(document, response["$ref"])
            for media in response.get("content", {}).values():
                Draft202012Validator.check_schema(media["schema"])
            assert response["description"], f"{method} {path} {status}: no description"


def test_operations_are_well_formed(document):
    ids = [op["operationId"] for op in operations(document).values()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for (method, path), operation in operations(document).items():
        where = f"{method} {path}"
        item = document["paths"][path]
        parameters = item.get("parameters", []) + operation.get("parameters", [])
        keys = [(p["name"], p["in"]) for p in parameters]
        assert len(keys) == len(set(keys)), f"{where}: duplicate parameters"
        in_path = {p["name"] for p in parameters if p["in"] == "path"}
        assert in_path == set(re.findall(r"\{([^}]+)\}", path)), f"{where}: path parameters"
        assert all(p["required"] for p in parameters if p["in"] == "path")
        statuses = set(operation["responses"])
        assert any(s.startswith("2") or s == "101" for s in statuses), \
            f"{where}: no success response"
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= statuses, f"{where}: body errors"
            assert method in ("POST", "PUT", "PATCH")
        anonymous = operation.get("security") == []
        assert ("401" not in statuses or path in ("/api/v1/login", "/api/v1/registry/token")) \
            if anonymous \
            else "401" in statuses, f"{where}: 401"


def test_anonymous_endpoints(document):
    anonymous = {(method, path) for (method, path), op in operations(document).items()
                 if op.get("security") == []}
    assert anonymous == {("POST", "/api/v1/login"), ("GET", "/healthz"),
                         ("GET", "/api/v1/openapi.json"),
                         ("GET", "/.well-known/treadmill/capability-keys"),
                         ("GET", "/api/v1/registry/token")}


def test_watch_is_an_event_stream(document):
    ok = document["paths"]["/api/v1/jobs/{job_id}/events/watch"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]


def test_query_parameters(document):
    def names(method: str, path: str) -> set[str]:
        op = operations(document)[(method, path)]
        return {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}

    assert names("GET", "/api/v1/jobs") == {"state", "owner", "limit", "cursor",
                                              "id_prefix", "restart_of"}
    assert names("GET", "/api/v1/jobs/{job_id}/events") == {"after"}
    assert names("GET", "/api/v1/jobs/{job_id}/events/watch") == {"after"}
    assert names("GET", "/api/v1/tokens") == {"user"}


# -- response schemas against views.py -------------------------------------------------

NOW = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
JOB_ID = uuid4()

ROWS: dict[str, tuple[Any, dict[str, Any]]] = {
    "User": (views.user, {"id": 1, "name": "alice", "admin": False, "disabled": False,
                          "created_at": NOW}),
    "Token": (views.token, {"id": uuid4(), "user": "alice", "label": "login",
                            "created_at": NOW, "expires_at": NOW, "last_used_at": None,
                            "revoked_at": None}),
    "Host": (views.host, {"id": 1, "name": "h1", "tags": ["qemu"], "owner": None,
                          "description": "", "enabled": True, "healthy": True,
                          "consecutive_failures": 0, "connected": False,
                          "last_seen_at": None, "current_job": JOB_ID, "created_at": NOW,
                          "instance": None, "kinds": ["qemu"]}),
    "Image": (views.image, {"id": 1, "name": "org/base", "digest": "sha256:" + "0" * 64,
                            "stores": ["https://store.example/"], "owner": "alice",
                            "description": "", "host_tags": ["qemu"], "created_at": NOW,
                            "updated_at": NOW, "results": {"end": "^done$"}, "kind": "qemu"}),
    "GrantRecord": (views.grant, {"user": "*", "privilege": "read", "created_at": NOW}),
    "Job": (views.job, {
        "id": JOB_ID, "seq": 7, "owner": "alice", "label": "", "image_name": None,
        "image_digest": "sha256:" + "0" * 64, "image_stores": [], "image_kind": None,
        "tags": ["qemu"],
        "parameters": {"A": {"value": "1", "secret": False}, "B": {"value": "s",
                                                                   "secret": True}},
        "timeout": 3600.0, "queue_timeout": 86400.0, "max_restarts": 0, "restart_of": None,
        "restarts_left": 0, "state": "terminated", "stage": None, "host": "h1",
        "log_servers": ["http://logs.example"], "endpoints": [],
        "termination_reason": "workload_exited", "exit_status": 0,
        "termination_message": None, "created_at": NOW, "assigned_at": NOW,
        "started_at": NOW, "ready_at": None, "terminated_at": NOW, "updated_at": NOW,
        "results": {"test_case": "(?P<name>x)(?P<result>y)"}}),
    "Event": (views.event, {"seq": 3, "job": JOB_ID, "at": NOW, "state": "initializing",
                            "stage": "booting", "reason": None, "exit_status": None,
                            "message": None}),
    "HealthCheck": (views.health_check, {
        "scope": "tag", "target": "qemu", "image": "org/check",
        "image_digest": "sha256:" + "0" * 64, "parameters": {"B": {"value": "s", "secret": True}},
        "expect_exit": 0, "timeout": 600.0, "every_jobs": 10, "every_hours": None,
        "after_failures": 2,
        "set_by": "admin", "set_at": NOW}),
    "HostHealth": (lambda found: views.host_health("h1", found), {
        "healthy": False, "enabled": True, "consecutive_failures": 3, "jobs_since_check": 0,
        "last_check_at": NOW, "check": None,
        "events": [{"at": NOW, "event": "check_failed", "job": JOB_ID,
                    "reason": "workload_exited", "healthy": False, "actor": "switchboard",
                    "message": "failed: workload_exited, exit status 1"},
                   {"at": NOW, "event": "enabled", "job": None, "reason": None,
                    "healthy": True, "actor": "admin", "message": ""}]}),
    "Snapshot": (views.snapshot, {
        "id": JOB_ID, "job_id": JOB_ID, "name": "alice/snap", "repository": "alice/snap",
        "store": "https://store.example", "owner": "alice", "description": "",
        "state": "failed", "digest": None, "error_code": "unknown_job", "message": "gone",
        "created_at": NOW, "finished_at": NOW}),
}


def _validate(document: dict[str, Any], name: str, value: Any) -> None:
    """Validate ``value`` against a component schema, resolving refs in the document."""
    base = "urn:treadmill:openapi"
    registry = Registry().with_resource(base, Resource(document, DRAFT202012))
    validator = Draft202012Validator({"$ref": f"{base}#/components/schemas/{name}"},
                                     registry=registry,
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    validator.validate(value)


ADMIN_ONLY = {"Host": {"instance"}}
"""Properties of a view that only admins get (not required)."""


@pytest.mark.parametrize("name", sorted(ROWS))
def test_response_schema_matches_view(document, name):
    view, row = ROWS[name]
    value = json.loads(dumps(view(row)))
    schema = document["components"]["schemas"][name]
    assert set(schema["properties"]) == set(value), f"{name}: properties differ from views.py"
    assert set(schema["required"]) == set(value) - ADMIN_ONLY.get(name, set())
    _validate(document, name, value)


def test_composed_response_schemas(document):
    token = json.loads(dumps(views.token(ROWS["Token"][1])))
    host = json.loads(dumps(views.host(ROWS["Host"][1])))
    job = json.loads(dumps(views.job(ROWS["Job"][1])))
    _validate(document, "NewToken", {**token, "token": "secret"})
    _validate(document, "NewHost", {**host, "token": "secret"})
    _validate(document, "JobList", {"jobs": [job], "next_cursor": "ajE"})
    _validate(document, "TokenList", {"tokens": [token]})
    with pytest.raises(ValidationError):
        _validate(document, "NewToken", token)
    queued = {**ROWS["Job"][1], "state": "queued", "host": None}
    _validate(document, "Job", json.loads(dumps(views.job(queued))))


def test_error_schema_matches_responses(document):
    for status, code in STATUS_CODES.items():
        _validate(document, "Error", json.loads(error_body(code, f"status {status}")))


# -- (3) routes of the Klein app ------------------------------------------------------


def _template(rule: str) -> str:
    """A werkzeug rule as an OpenAPI path: ``<path:name>`` is ``{name}``."""
    return re.sub(r"<(?:[A-Za-z_]\w*(?:\([^)]*\))?:)?([A-Za-z_]\w*)>", r"{\1}", rule)


def app_routes() -> set[tuple[str, str]]:
    rules = [(rule, _template(rule.rule)) for rule in SwitchboardAPI.app.url_map.iter_rules()]
    # The parameter each collection names its items by, from its own item rule.
    ident = {}
    for _, path in rules:
        match = re.fullmatch(r"/api/v1/([a-z]+)/\{(\w+)\}", path)
        if match and match.group(1) in KIND_OF_COLLECTION:
            ident[match.group(1)] = match.group(2)
    assert set(ident) == set(KIND_OF_COLLECTION), ident
    routes = set()
    for rule, path in rules:
        if rule.endpoint in DISPATCH_ONLY:
            continue
        methods = set(rule.methods or ()) - IGNORED_METHODS
        expanded = [path]
        if path.startswith(GENERIC_GRANTS):
            expanded = [path.replace(GENERIC_GRANTS, f"/api/v1/{c}/{{{i}}}/grants")
                        for c, i in ident.items()]
        routes.update((method, p) for method in methods for p in expanded)
    return routes


def test_dispatch_only_endpoints_exist():
    endpoints = {rule.endpoint for rule in SwitchboardAPI.app.url_map.iter_rules()}
    assert endpoints >= DISPATCH_ONLY


def test_routes_agree_with_the_app(document):
    in_app = app_routes()
    in_document = set(operations(document))
    assert sorted(in_app - in_document) == [], "routes missing from the OpenAPI document"
    assert sorted(in_document - in_app) == [], "documented routes the app does not serve"


# -- (4) docs/api.md ----------------------------------------------------------------------

ROW = re.compile(r"^\|\s*(GET|POST|PUT|PATCH|DELETE)\s*\|\s*`([^`]+)`")


def _shape(path: str) -> str:
    """A path with its parameter names erased (docs/api.md says ``{id}`` for ``{job_id}``)."""
    return re.sub(r"\{[^}]*\}", "{}", path.split("?")[0])


def api_md_routes() -> set[tuple[str, str]]:
    routes = set()
    for line in API_MD.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if not match:
            continue
        method, path = match.groups()
        kinds = KIND_OF_COLLECTION if "KIND" in path else [None]
        for kind in kinds:
            concrete = path.replace("KIND", kind).replace("ID", "{}") if kind else path
            routes.add((method, _shape(concrete)))
    return routes


def test_api_md_routes_are_documented(document):
    in_md = api_md_routes()
    assert len(in_md) > 30, "docs/api.md tables not found"
    in_document = {(method, _shape(path)) for method, path in operations(document)}
    assert sorted(in_md - in_document) == [], "docs/api.md routes missing from openapi.json"


def test_document_routes_are_in_api_md(document):
    in_document = {(method, _shape(path)) for method, path in operations(document)}
    assert sorted(in_document - api_md_routes()) == [], "routes missing from docs/api.md"


@pytest.mark.parametrize("prefix", [
    "5", "5b7c0c9e", "5B7C-0C9E", "5b7c0c9e-8a41-4f7e-b1b4-3c2d9e0f1a22", "a" * 32, "a" * 33,
    "a" * 36, "a-" * 18, "-" * 3, "-a-", "g", "", "5b7c0c9e-8a41-4f7e-b1b4-3c2d9e0f1a22-"])
def test_id_prefix_schema_is_what_the_switchboard_accepts(document, prefix):
    """``GET /api/v1/jobs?id_prefix=``: the document's schema admits a prefix exactly when
    the switchboard answers it (not with 400)."""
    op = operations(document)[("GET", "/api/v1/jobs")]
    schema = next(p["schema"] for p in op["parameters"] if p["name"] == "id_prefix")
    try:
        prefix_range(prefix)
        accepted = True
    except ApiError:
        accepted = False
    assert Draft202012Validator(schema).is_valid(prefix) == accepted


def api_md_shapes() -> dict[str, set[str]]:
    """docs/api.md's ``\\`Name\\`: \\`{"a", "b"?, "c": {…}}\\``` lines: each shape's
    top-level keys."""
    text = API_MD.read_text()
    shapes: dict[str, set[str]] = {}
    for match in re.finditer(r"`(\w+)`: `\{", text):
        depth, keys, at = 0, set(), match.end() - 1
        while True:
            char = text[at]
            if char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    break
            elif char == '"' and depth == 1:
                end = text.index('"', at + 1)
                value = text[:at].rstrip().endswith((":", "|"))  # "state": "a" | "b"
                if not value and re.fullmatch(r"\w+", text[at + 1:end]):
                    keys.add(text[at + 1:end])
                at = end
            at += 1
        shapes[match.group(1)] = keys
    return shapes


def test_api_md_shapes_name_every_property(document):
    """Each response shape docs/api.md spells out names the properties of its schema
    (admin-only ones are described beside it); ``Job`` missed ``ssh_host_keys``."""
    shapes = api_md_shapes()
    checked = 0
    for name, schema in document["components"]["schemas"].items():
        if name not in shapes or name not in openapi.RESPONSE_SCHEMAS:
            continue
        checked += 1
        assert shapes[name] == set(schema["properties"]) - ADMIN_ONLY.get(name, set()), name
    assert checked >= 8, sorted(shapes)
