"""The OpenAPI 3.1 description of the switchboard HTTP API (``docs/openapi.json``).

:func:`build` assembles the document from code: the request body schemas are
:data:`treadmill.switchboard.schemas.REQUEST_BODIES` verbatim (OpenAPI 3.1
speaks JSON Schema 2020-12), the enumerations come from the job state machine,
the privileges and the error codes; the response schemas mirror
:mod:`treadmill.switchboard.views`. ``tools/gen-openapi`` writes the file and
``tests/switchboard/test_openapi.py`` keeps it, the Klein routes of
:class:`~treadmill.switchboard.api.SwitchboardAPI` and ``docs/api.md`` in step.

Path parameters carry the names of the Klein rules (``<job_id>`` is
``{job_id}``); the generic grant rules are spelled out per collection.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from treadmill.common.http import STATUS_CODES
from treadmill.protocol.results import PATTERNS_SCHEMA
from treadmill.switchboard import schemas
from treadmill.switchboard.access import PRIVILEGES
from treadmill.switchboard.api import Limits
from treadmill.switchboard.health import Event
from treadmill.switchboard.jobstate import Reason, Stage, State

TITLE = "Treadmill switchboard API"
VERSION = "1"
SECURITY_SCHEME = "apiToken"

JSON = "application/json"

# -- schema fragments ----------------------------------------------------------

STRING: dict[str, Any] = {"type": "string"}
BOOLEAN: dict[str, Any] = {"type": "boolean"}
INTEGER: dict[str, Any] = {"type": "integer"}
NUMBER: dict[str, Any] = {"type": "number"}
UUID: dict[str, Any] = {"type": "string", "format": "uuid"}
OPTIONAL_UUID: dict[str, Any] = {"type": ["string", "null"], "format": "uuid"}
TIME: dict[str, Any] = {"type": "string", "format": "date-time"}
OPTIONAL_TIME: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
OPTIONAL_STRING: dict[str, Any] = {"type": ["string", "null"]}
OPTIONAL_INTEGER: dict[str, Any] = {"type": ["integer", "null"]}
STRINGS: dict[str, Any] = {"type": "array", "items": STRING}


def _enum(values: Any, *, nullable: bool = False) -> dict[str, Any]:
    listed: list[Any] = [str(value) for value in values]
    if nullable:
        return {"type": ["string", "null"], "enum": [*listed, None]}
    return {"type": "string", "enum": listed}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _record(properties: dict[str, Any], description: str) -> dict[str, Any]:
    """A response object: every property is always present."""
    return {"type": "object", "description": description, "properties": properties,
            "required": list(properties)}


def _with_token(record: str, description: str) -> dict[str, Any]:
    """The object ``record`` and a secret ``token`` beside it (answered once)."""
    return {"description": description,
            "allOf": [_ref(record), {"type": "object", "properties": {"token": STRING},
                                     "required": ["token"]}]}


def _list_of(key: str, item: str, **extra: Any) -> dict[str, Any]:
    properties = {key: {"type": "array", "items": _ref(item)}, **extra}
    return {"type": "object", "properties": properties, "required": [key]}


# -- response schemas (see views.py) -----------------------------------------------

USER = _record({
    "name": STRING, "admin": BOOLEAN, "disabled": BOOLEAN, "created_at": TIME,
}, "A user account.")

TOKEN = _record({
    "id": UUID, "user": STRING, "label": STRING, "created_at": TIME,
    "expires_at": OPTIONAL_TIME, "last_used_at": OPTIONAL_TIME, "revoked_at": OPTIONAL_TIME,
}, "An API token (never its secret).")

SSH_KEY = _record({
    "id": UUID, "user": STRING,
    "type": {"enum": ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                      "ecdsa-sha2-nistp521", "ssh-rsa"]},
    "key": {"type": "string", "description": "`TYPE BASE64`, canonical, without comment."},
    "comment": STRING,
    "fingerprint": {"type": "string", "description": "`SHA256:…`, as `ssh-keygen -l`."},
    "created_at": TIME,
}, "A user's SSH public key; jobs carry their owner's and managers' keys to the guest.")

NEW_TOKEN = _with_token("Token", "A new API token with its secret, shown only this once.")

HOST = _record({
    "name": STRING, "tags": STRINGS, "owner": OPTIONAL_STRING, "description": STRING,
    "enabled": {"type": "boolean", "description": "False when drained by an operator."},
    "healthy": {"type": "boolean",
                "description": "False when taken out of service after repeated host-side "
                               "failures."},
    "consecutive_failures": INTEGER, "connected": BOOLEAN, "last_seen_at": OPTIONAL_TIME,
    "current_job": OPTIONAL_UUID, "created_at": TIME,
    "held_by": {"type": ["string", "null"],
                "description": "The owner of current_job (null when not shown)."},
    "held_until": {**OPTIONAL_TIME,
                   "description": "Until when current_job holds the host: its deadline (a "
                                  "reservation's end), or for a failed job whose host is "
                                  "held for debugging, the hold's end (null when not shown "
                                  "or not yet started)."},
    "kinds": {"type": ["array", "null"], "items": STRING,
              "description": "The image kinds its driver runs, as its supervisor reported "
                             "them; null: any kind (a supervisor that reports none)."},
}, "A host of the testbed.")
HOST["properties"]["instance"] = {  # Not required: shown to admins only.
    "type": ["string", "null"],
    "description": "Admins only: the switchboard instance holding the host's supervisor "
                   "link (null when not connected)."}

NEW_HOST = _with_token("Host", "A host with its (new) host token, shown only this once.")

IMAGE = _record({
    "name": STRING, "digest": STRING, "stores": STRINGS, "owner": OPTIONAL_STRING,
    "description": STRING,
    "host_tags": {**STRINGS, "description": "The host tags of a job that names this image "
                                            "and asks for none."},
    "kind": {**_enum(["qemu", "board"], nullable=True),
             "description": "The image's kind (its manifest's artifactType): only hosts "
                            "that run it get its jobs; null: unknown, any host."},
    "created_at": TIME, "updated_at": TIME,
    "results": {"oneOf": [{"type": "null"}, PATTERNS_SCHEMA],
                "description": "Console patterns of the image's jobs (docs/results.md)."},
}, "An image of the catalogue.")

IMAGE_VERSION = _record({
    "version": INTEGER, "digest": STRING, "stores": STRINGS, "host_tags": STRINGS,
    "kind": _enum(["qemu", "board"], nullable=True),
    "by": {**OPTIONAL_STRING, "description": "Who made this version current (null: a user "
                                             "since deleted)."},
    "created_at": TIME,
    "note": {**STRING, "description": "created, replaced, rollback to version N, or "
                                      "snapshot of job J."},
}, "A version of a catalogue image.")

IMAGE_STORE = _record({
    "url": {"type": "string", "description": "The store's base URL (lowercase scheme and "
                                             "host, no final /)."},
    "service": {"type": "string", "description": "Its service name: the audience of the "
                                                 "registry tokens issued for it."},
    "description": STRING,
    "cache": {"type": "boolean", "description": "A site image cache."},
    "created_at": TIME,
}, "An image store registered by an operator.")

GRANT_RECORD = _record({
    "user": {"type": "string", "description": '"*" means every user.'},
    "privilege": _enum(sorted({p for privileges in PRIVILEGES.values() for p in privileges})),
    "created_at": TIME,
}, "A privilege granted on a host, job or image.")

JOB_PARAMETER: dict[str, Any] = {"oneOf": [
    {"type": "object", "properties": {"value": STRING, "secret": {"const": False}},
     "required": ["value", "secret"]},
    {"type": "object", "properties": {"secret": {"const": True}}, "required": ["secret"],
     "additionalProperties": False},
], "description": "Secret parameters read back without their value."}

JOB = _record({
    "id": UUID, "owner": STRING, "label": STRING,
    "image": _record({"name": OPTIONAL_STRING, "digest": STRING, "stores": STRINGS,
                      "kind": _enum(["qemu", "board"], nullable=True)},
                     "The image the job runs (enqueued by digest: the name of a catalogue entry "
                     "with that digest the owner may use, or none)."),
    "tags": STRINGS,
    "parameters": {"type": "object", "additionalProperties": JOB_PARAMETER},
    "timeout": NUMBER, "queue_timeout": NUMBER, "max_restarts": INTEGER,
    "restart_of": OPTIONAL_UUID, "restarts_left": INTEGER,
    "state": _enum(State), "stage": _enum(Stage, nullable=True), "host": OPTIONAL_STRING,
    "endpoints": {"type": "array", "items": {
        "type": "object", "required": ["service", "proxy"],
        "properties": {"service": STRING, "proxy": STRING, "host": STRING,
                       "port": INTEGER, "url": STRING,
                       "auth": {"enum": ["service", "token"], "description":
                                "token: url needs a console token (POST .../console-token)"}}},
        "description": "Public endpoints through rendezvous proxies (tml job ssh/connect)."},
    "ssh_host_keys": {**STRINGS, "description": "The guest's SSH host keys (`TYPE BASE64`), "
                                                "as its agent reported them (tml job ssh)."},
    "logs": {"type": "array", "items": STRING,
             "description": "Log servers holding the job's logs (POST .../logs/token)."},
    "results": _record({
        "patterns": {"oneOf": [{"type": "null"}, PATTERNS_SCHEMA],
                     "description": "The console patterns in force: the job's own, or its "
                                    "image's."},
        "stream": {"const": "results"},
        "servers": {**STRINGS, "description": "Log servers holding the results stream."},
    }, "The job's test results (docs/results.md): a stream on its log servers."),
    "termination": {
        "oneOf": [{"type": "null"}, _record({
            "reason": _enum(Reason, nullable=True), "exit_status": OPTIONAL_INTEGER,
            "message": OPTIONAL_STRING,
        }, "How the job ended.")],
        "description": "Null until the job is terminating or terminated.",
    },
    "created_at": TIME, "assigned_at": OPTIONAL_TIME, "started_at": OPTIONAL_TIME,
    "ready_at": OPTIONAL_TIME, "terminated_at": OPTIONAL_TIME, "updated_at": TIME,
    "reservation": {"type": "boolean",
                    "description": "A reservation: holds its host for interactive work until "
                                   "its deadline (docs/jobs.md, Reservations)."},
    "deadline": {**OPTIONAL_TIME,
                 "description": "When the job is stopped (execution_timeout); null while "
                                "queued. POST .../extend moves it."},
    "state_message": {**OPTIONAL_STRING,
                      "description": "A queued job's reason to wait, when every host that "
                                     "could run it is drained or out of service (null "
                                     "otherwise)."},
    "health_check": {"type": "boolean",
                     "description": "A host's health check, started by the switchboard "
                                    "(docs/operations.md, Host health)."},
    "hold_on_failure": {"type": ["number", "null"],
                        "description": "Seconds its host is kept as it is when the job fails "
                                       "(docs/jobs.md, Holding a failed job's host)."},
    "held_until": {**OPTIONAL_TIME,
                   "description": "While the failed job's host is held for debugging: when "
                                  "the hold ends (POST .../terminate ends it at once, "
                                  "POST .../extend moves it later); null otherwise."},
}, "A job: a workload on one host. States and stages are described in docs/jobs.md.")

HEALTH_CHECK = _record({
    "scope": _enum(("host", "tag")), "target": {"type": "string",
                                                "description": "The host's name or the tag."},
    "image": _record({"name": STRING, "digest": STRING},
                     "The image as set (a catalogue name or a digest) and its digest."),
    "parameters": {"type": "object", "description": "As a job's (secret values hidden)."},
    "expect_exit": {"type": "integer", "description": "The exit status that passes."},
    "timeout": {"type": "number"},
    "every_jobs": {**OPTIONAL_INTEGER,
                   "description": "Run after this many of the host's jobs (null: not by "
                                  "count)."},
    "every_hours": {"type": ["number", "null"],
                    "description": "Run on the idle host this many hours after its last "
                                   "check (null: not by the clock)."},
    "after_failures": {**OPTIONAL_INTEGER,
                       "description": "Run after this many host-side failures in a row "
                                      "(null: hosts.max_failures)."},
    "set_by": STRING, "set_at": TIME,
}, "An operator's health check of one host or of every host with a tag (docs/operations.md, "
   "Host health).")

HEALTH_EVENT = _record({
    "at": TIME,
    "event": _enum(Event),
    "job": {**OPTIONAL_UUID, "description": "The job concerned (null when not yours to "
                                            "read)."},
    "reason": _enum(Reason, nullable=True), "healthy": {
        "type": "boolean", "description": "The host's health after the event."},
    "actor": {"type": "string", "description": "Who: a user, or `switchboard`."},
    "message": STRING,
}, "One event of a host's health history.")

HOST_HEALTH = _record({
    "host": STRING, "healthy": BOOLEAN, "enabled": BOOLEAN, "consecutive_failures": INTEGER,
    "jobs_since_check": INTEGER, "last_check_at": OPTIONAL_TIME,
    "check": {"oneOf": [{"type": "null"}, _ref("HealthCheck")],
              "description": "The health check that applies (the host's, else its first "
                             "tag's)."},
    "events": {"type": "array", "items": _ref("HealthEvent"),
               "description": "Newest first, at most 100."},
}, "A host's health and its history.")

SNAPSHOT = _record({
    "id": UUID, "job": UUID, "name": STRING, "repository": STRING, "store": STRING,
    "owner": STRING, "description": STRING,
    "state": {"enum": ["pending", "done", "failed"]},
    "digest": {"type": ["string", "null"],
               "description": "The new image's manifest digest, once uploaded."},
    "error": {"oneOf": [{"type": "null"}, _record({"code": STRING, "message": STRING},
                                                   "Why the snapshot failed.")]},
    "created_at": TIME, "finished_at": OPTIONAL_TIME,
}, "An ended job's disk, uploaded by its host as a new catalogue image (docs/qemu.md).")

EVENT = _record({
    "seq": INTEGER, "job": UUID, "at": TIME, "state": _enum(State),
    "stage": _enum(Stage, nullable=True), "reason": _enum(Reason, nullable=True),
    "exit_status": OPTIONAL_INTEGER, "message": OPTIONAL_STRING,
}, "One change of a job's state or stage.")

ERROR: dict[str, Any] = {
    "type": "object", "description": "The one shape of every error.",
    "properties": {"error": {
        "type": "object",
        "properties": {"code": _enum(STATUS_CODES.values()), "message": STRING},
        "required": ["code", "message"],
    }},
    "required": ["error"],
}

JWK: dict[str, Any] = {
    "type": "object", "description": "An Ed25519 public key (RFC 8037).",
    "properties": {"kty": {"const": "OKP"}, "crv": {"const": "Ed25519"}, "x": STRING,
                   "kid": STRING, "alg": STRING, "use": {"const": "sig"}},
    "required": ["kty", "crv", "x", "kid"],
}

AUDIT_ENTRY = _record({
    "id": {"type": "integer"}, "at": TIME, "actor": STRING,
    "actor_kind": _enum(("user", "host", "manhole", "system")),
    "source": {"type": "string", "description": "The client's address ('' if none)."},
    "action": {"type": "string", "description": "A dotted name: token.create, host.drain, "
                                                "... (docs/operations.md, \"Audit log\")."},
    "subject_kind": _enum(("user", "host", "job", "image", "store", "namespace")),
    "subject_id": STRING, "subject_user": OPTIONAL_STRING,
    "details": {"type": "object", "description": "What changed; never a secret."},
}, "One audit record (append-only).")

RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "User": USER, "Token": TOKEN, "NewToken": NEW_TOKEN, "Host": HOST, "NewHost": NEW_HOST,
    "Image": IMAGE, "GrantRecord": GRANT_RECORD, "Job": JOB, "Event": EVENT, "Error": ERROR,
    "Snapshot": SNAPSHOT, "SnapshotList": _list_of("snapshots", "Snapshot"),
    "JWK": JWK,
    "UserList": _list_of("users", "User"),
    "TokenList": _list_of("tokens", "Token"),
    "SshKey": SSH_KEY, "SshKeyList": _list_of("keys", "SshKey"),
    "HostList": _list_of("hosts", "Host"),
    "HealthCheck": HEALTH_CHECK, "HealthCheckList": _list_of("checks", "HealthCheck"),
    "HealthEvent": HEALTH_EVENT, "HostHealth": HOST_HEALTH,
    "ImageList": _list_of("images", "Image"),
    "ImageVersion": IMAGE_VERSION,
    "ImageHistory": {"type": "object", "description": "An image's kept versions.",
                     "properties": {"name": STRING, "current": STRING,
                                    "versions": {"type": "array",
                                                 "items": _ref("ImageVersion")}},
                     "required": ["name", "current", "versions"]},
    "ImageStore": IMAGE_STORE, "ImageStoreList": _list_of("stores", "ImageStore"),
    "GrantList": _list_of("grants", "GrantRecord"),
    "JobList": _list_of("jobs", "Job", next_cursor={
        "type": "string", "description": "The cursor of the next page; absent on the last."}),
    "EventList": _list_of("events", "Event"),
    "AuditEntry": AUDIT_ENTRY,
    "AuditList": _list_of("entries", "AuditEntry", next_cursor={
        "type": "string", "description": "The cursor of the next page; absent on the last."}),
    "CapabilityKeys": _list_of("keys", "JWK"),
    "Health": {"type": "object", "properties": {"status": {"const": "ok"}},
               "required": ["status"]},
    "OpenAPIDocument": {"type": "object", "required": ["openapi", "info", "paths"],
                        "description": "This document (docs/openapi.json)."},
    "LogsToken": {"type": "object", "required": ["servers", "token", "expires_in"],
                  "properties": {"servers": STRINGS, "token": STRING,
                                 "expires_in": {"type": "integer"}}},
    "ConsoleToken": {"type": "object", "required": ["token", "access", "expires_in",
                                                    "endpoints"],
                     "properties": {"token": STRING, "access": {"enum": ["read", "manage"]},
                                    "expires_in": {"type": "integer"},
                                    "endpoints": {"type": "array",
                                                  "items": {"type": "object"}}}},
    "RegistryToken": {"type": "object", "required": ["token", "access_token", "expires_in",
                                                     "issued_at"],
                      "properties": {"token": STRING, "access_token": STRING,
                                     "expires_in": {"type": "integer"},
                                     "issued_at": {"type": "string", "format": "date-time"}}},
}
"""Response schemas by name. The request body ``Grant`` takes the plain name,
so the grant as the API returns it is ``GrantRecord``."""

# -- responses and parameters --------------------------------------------------------

ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Malformed or invalid request; the message names the field."),
    401: ("Unauthenticated", "Missing, unknown, expired or revoked API token."),
    403: ("Forbidden", "The token's user lacks the privilege."),
    404: ("NotFound", "No such resource (or not visible to the token's user)."),
    409: ("Conflict", "The request conflicts with the current state."),
    413: ("TooLarge", "The request body is too large."),
    415: ("UnsupportedMediaType", "The request body is not JSON."),
    429: ("TooManyRequests", "Too many password attempts from this address or on this "
                             "user; retry after Retry-After seconds."),
    503: ("Unavailable", "The database does not answer (any route may answer this; "
                         "retry after Retry-After seconds)."),
}


def _error_response(status: int) -> dict[str, Any]:
    description = ERROR_RESPONSES[status][1]
    response: dict[str, Any] = {"description": f"{description} ({STATUS_CODES[status]})",
                                "content": {JSON: {"schema": _ref("Error")}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {
            "description": 'Bearer realm="treadmill"', "schema": STRING}}
    if status == 503:
        response["headers"] = {"Retry-After": {
            "description": "Seconds to wait before trying again.",
            "schema": {"type": "integer", "minimum": 0}}}
    if status == 429:
        response["headers"] = {"Retry-After": {
            "description": "Seconds until the next attempt may succeed.",
            "schema": {"type": "integer"}}}
    return response


def _path_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema}


def _query_param(name: str, schema: dict[str, Any], description: str,
                 **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema, **extra}


P_USER = _path_param("name", schemas.NAME, "The user's name.")
P_TOKEN = _path_param("token_id", UUID, "The token's id.")
P_HOST = _path_param("name", schemas.NAME, "The host's name.")
P_IMAGE = _path_param("name", schemas.IMAGE_NAME,
                      "The image's name; it may contain `/`, which is sent as is.")
P_JOB = _path_param("job_id", UUID, "The job's id.")
P_GRANTEE = _path_param("user", schemas.USER_OR_EVERYONE,
                        'The user the grant is to; "*" for every user.')

H_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Makes the request safe to retry: the same user sending the same key "
                   "and body again within 24 hours gets the first answer, and no second "
                   "job. 1 to 255 printable ASCII characters, e.g. a random UUID.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255,
               "pattern": "^[\\x20-\\x7e]+$"}}

Q_AFTER = _query_param("after", {"type": "integer", "minimum": 0, "maximum": 2**31 - 1,
                                 "default": 0}, "Only events with a larger `seq`.")


# -- operations ----------------------------------------------------------------------


def _operation(operation_id: str, tag: str, summary: str, status: int,
               result: str | None = None, *, body: str | None = None,
               body_required: bool = True, errors: tuple[int, ...] = (),
               query: tuple[dict[str, Any], ...] = (), anonymous: bool = False,
               description: str | None = None) -> dict[str, Any]:
    """One operation. Authenticated ones may answer 401; those with a body 400, 413, 415."""
    codes = set(errors)
    if not anonymous:
        codes.add(401)
    if body is not None:
        codes.update((400, 413, 415))
    if result is None:
        success: dict[str, Any] = {"description": "Done; no content."}
    else:
        success = {"description": {200: "OK", 201: "Created"}.get(status, "Accepted"),
                   "content": {JSON: {"schema": _ref(result)}}}
    responses = {str(status): success}
    for code in sorted(codes):
        responses[str(code)] = {"$ref": f"#/components/responses/{ERROR_RESPONSES[code][0]}"}
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [tag],
                                 "summary": summary, "responses": responses}
    if description is not None:
        operation["description"] = description
    if query:
        operation["parameters"] = list(query)
    if body is not None:
        operation["requestBody"] = {"required": body_required,
                                    "content": {JSON: {"schema": _ref(body)}}}
    if anonymous:
        operation["security"] = []
    return operation


def _identity() -> dict[str, dict[str, Any]]:
    return {
        "/api/v1/whoami": {"get": _operation(
            "whoami", "Identity", "The token's user.", 200, "User")},
        "/api/v1/login": {"post": _operation(
            "login", "Identity", "Exchange a password for a new API token.", 201, "NewToken",
            body="Login", errors=(401, 403, 429, 503), anonymous=True,
            description="401 for a wrong user name or password (or a disabled user); 403 "
                        "when a non-admin asks for a token that never expires; 429 over "
                        "the password attempt limits (login.* settings); 503 with "
                        "Retry-After when too many password checks are under way.")},
        "/api/v1/tokens": {
            "get": _operation(
                "list_tokens", "Identity", "List API tokens.", 200, "TokenList",
                errors=(400, 403, 404),
                query=(_query_param("user", schemas.NAME,
                                    "Whose tokens (admins only; default: your own)."),)),
            "post": _operation(
                "create_token", "Identity", "Create an API token.", 201, "NewToken",
                body="TokenCreate", body_required=False, errors=(403, 404),
                description="No body at all is the same as `{}`. Admins may create "
                            "tokens for other users and tokens that never expire."),
        },
        "/api/v1/tokens/{token_id}": {"parameters": [P_TOKEN], "delete": _operation(
            "revoke_token", "Identity", "Revoke an API token (its user or an admin).", 200,
            "Token", errors=(404,))},
        "/api/v1/users": {
            "get": _operation("list_users", "Identity", "List users (admin).", 200,
                              "UserList", errors=(403,)),
            "post": _operation("create_user", "Identity", "Create a user (admin).", 201,
                               "User", body="UserCreate", errors=(403, 409)),
        },
        "/api/v1/users/{name}": {
            "parameters": [P_USER],
            "get": _operation("show_user", "Identity", "A user (self or admin).", 200,
                              "User", errors=(403, 404)),
            "patch": _operation(
                "update_user", "Identity", "Change a user (admin; self for password only).",
                200, "User", body="UserUpdate", errors=(403, 404)),
        },
    }


def _ssh_keys() -> dict[str, dict[str, Any]]:
    q_user = _query_param("user", schemas.NAME, "Whose keys (admins only; default: your own).")
    return {
        "/api/v1/keys": {
            "get": _operation("list_ssh_keys", "Identity", "List SSH public keys.", 200,
                              "SshKeyList", errors=(400, 403, 404), query=(q_user,)),
            "post": _operation(
                "add_ssh_key", "Identity", "Register an SSH public key.", 201, "SshKey",
                body="SshKeyCreate", errors=(403, 404, 409), query=(q_user,),
                description="`key` is one `TYPE BASE64 [COMMENT]` line of type ssh-ed25519, "
                            "ecdsa-sha2-nistp256/384/521 or ssh-rsa (2048 to 16384 bits). "
                            "409 if the user has it already or has 32 keys."),
        },
        "/api/v1/keys/{key_id}": {
            "parameters": [_path_param("key_id", UUID, "The key's id.")],
            "delete": _operation("delete_ssh_key", "Identity",
                                 "Remove an SSH public key (its user or an admin).", 200,
                                 "SshKey", errors=(404,))},
    }


def _hosts() -> dict[str, dict[str, Any]]:
    def manage(operation_id: str, summary: str) -> dict[str, Any]:
        return {"parameters": [P_HOST], "post": _operation(
            operation_id, "Hosts", summary, 200, "Host", errors=(403, 404))}

    return {
        "/api/v1/hosts": {
            "get": _operation("list_hosts", "Hosts", "List the hosts you may read.", 200,
                              "HostList"),
            "post": _operation(
                "create_host", "Hosts", "Register a host (admin).", 201, "NewHost",
                body="HostCreate", errors=(403, 404, 409),
                description="The response carries the host token the supervisor "
                            "authenticates with; 404 names an unknown owner."),
        },
        "/api/v1/hosts/{name}": {
            "parameters": [P_HOST],
            "get": _operation("show_host", "Hosts", "A host (read).", 200, "Host",
                              errors=(403, 404)),
            "delete": _operation(
                "delete_host", "Hosts", "Remove a host (admin).", 204, errors=(403, 404, 409),
                description="409 while the host runs a job."),
        },
        "/api/v1/hosts/{name}/tags": {"parameters": [P_HOST], "put": _operation(
            "set_host_tags", "Hosts", "Replace a host's tags (manage).", 200, "Host",
            body="HostTags", errors=(403, 404))},
        "/api/v1/hosts/{name}/drain": manage(
            "drain_host", "Stop assigning jobs to a host (manage)."),
        "/api/v1/hosts/{name}/enable": manage(
            "enable_host", "Assign jobs to a host again and reset its failure count (manage)."),
        "/api/v1/hosts/{name}/token": {"parameters": [P_HOST], "post": _operation(
            "host_token", "Hosts", "Issue a new host token (admin).", 200, "NewHost",
            errors=(403, 404), description="The old host token stops working.")},
        "/api/v1/hosts/{name}/health": {"parameters": [P_HOST], "get": _operation(
            "host_health", "Hosts", "A host's health and its history (read).", 200,
            "HostHealth", errors=(403, 404))},
        "/api/v1/health-checks": {"get": _operation(
            "list_health_checks", "Hosts", "Every health check (admin).", 200,
            "HealthCheckList", errors=(403,))},
        "/api/v1/health-checks/{kind}/{name}": {
            "parameters": [
                _path_param("kind", _enum(("hosts", "tags")),
                            "`hosts`: one host's check; `tags`: the check of every host "
                            "with the tag."),
                _path_param("name", {"type": "string", "maxLength": 128},
                            "The host's name or the tag (which may contain `/`).")],
            "put": _operation(
                "set_health_check", "Hosts", "Set a health check (admin).", 200,
                "HealthCheck", body="HealthCheckSet", errors=(403, 404),
                description="The image is resolved as in a job the admin enqueues; 404 "
                            "names an unknown host."),
            "delete": _operation(
                "unset_health_check", "Hosts", "Remove a health check (admin).", 204,
                errors=(400, 403, 404)),
        },
    }


def _images() -> dict[str, dict[str, Any]]:
    return {
        "/api/v1/images": {
            "get": _operation("list_images", "Images", "List the images you may use.", 200,
                              "ImageList"),
            "post": _operation("create_image", "Images",
                               "Add an image to the catalogue (you become its owner).", 201,
                               "Image", body="ImageCreate", errors=(403, 409),
                               description="Non-admins register only names in their own "
                                           "namespace (`alice/…`) or one granted them "
                                           "`manage`; names are unique regardless of case. "
                                           "Every store must be registered "
                                           "(`/api/v1/stores`); 400 otherwise."),
        },
        "/api/v1/images/{name}": {
            "parameters": [P_IMAGE],
            # Any privilege on an image includes use: no 403 here.
            "get": _operation("show_image", "Images", "An image (use).", 200, "Image",
                              errors=(404,)),
            "put": _operation("update_image", "Images", "Change an image (manage).", 200,
                              "Image", body="ImageUpdate", errors=(403, 404),
                              description="New stores must be registered; 400 otherwise."),
            "delete": _operation("delete_image", "Images", "Remove an image (manage).", 204,
                                 errors=(403, 404)),
        },
        "/api/v1/images/{name}/history": {
            "parameters": [P_IMAGE],
            "get": _operation("image_history", "Images",
                              "The image's versions, newest first (use).", 200,
                              "ImageHistory", errors=(404,),
                              description="A version is recorded at creation and on every "
                                          "change of digest (a replace or a rollback); the "
                                          "last `images.history` versions are kept."),
        },
        "/api/v1/images/{name}/rollback": {
            "parameters": [P_IMAGE],
            "post": _operation("rollback_image", "Images",
                               "Make a kept version current again (manage).", 200, "Image",
                               body="ImageRollback", errors=(403, 404),
                               description="Recorded as a new version; 404 for a version "
                                           "not kept."),
        },
        "/api/v1/stores": {
            "get": _operation(
                "list_stores", "Images", "The registered image stores.", 200, "ImageStoreList",
                description="Readable by every user and by hosts (host token): clients ask "
                            "tokens only for these services and fetch only from these "
                            "URLs."),
            "post": _operation(
                "create_store", "Images", "Register an image store or site cache (admin).",
                201, "ImageStore", body="StoreCreate", errors=(403, 409),
                description="409 when the URL or the service name is already registered."),
        },
        "/api/v1/stores/{service}": {
            "parameters": [_path_param("service", {"type": "string",
                                                   "pattern": schemas.SERVICE_PATTERN},
                                       "The store's service name.")],
            "delete": _operation(
                "delete_store", "Images", "Unregister an image store (admin).", 204,
                errors=(403, 404),
                description="No token is issued for its service any more and job starts "
                            "no longer name it; catalogue entries keep its URL."),
        },
    }


GRANT_COLLECTIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("hosts", "host", P_HOST), ("jobs", "job", P_JOB), ("images", "image", P_IMAGE))
"""The collections with grants: path segment, kind, and the parameter naming one."""


def _grants() -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}
    for collection, kind, ident in GRANT_COLLECTIONS:
        base = f"/api/v1/{collection}/{{{ident['name']}}}/grants"
        privilege = _path_param("privilege", _enum(PRIVILEGES[kind]), "The privilege.")
        paths[base] = {
            "parameters": [ident],
            "get": _operation(f"list_{kind}_grants", "Grants",
                              f"List the grants on a {kind} (manage).", 200, "GrantList",
                              errors=(403, 404)),
            "post": _operation(
                f"add_{kind}_grant", "Grants", f"Grant a privilege on a {kind} (manage).",
                201, "GrantRecord", body="Grant", errors=(403, 404, 409),
                description=f"Privileges of {kind}s: {', '.join(PRIVILEGES[kind])}; "
                            '`manage` implies the others. User "*" means every user.'),
        }
        paths[base + "/{user}/{privilege}"] = {
            "parameters": [ident, P_GRANTEE, privilege],
            "delete": _operation(f"revoke_{kind}_grant", "Grants",
                                 f"Revoke a grant on a {kind} (manage).", 204,
                                 errors=(403, 404)),
        }
    return paths


P_NAMESPACE = _path_param(
    "namespace", {"type": "string", "maxLength": 128, "pattern": r"^[A-Za-z0-9._-]+$"},
    "A repository namespace (a repository's first component), compared without case.")


def _namespace_grants() -> dict[str, dict[str, Any]]:
    base = "/api/v1/namespaces/{namespace}/grants"
    privilege = _path_param("privilege", _enum(PRIVILEGES["namespace"]), "The privilege.")
    return {
        base: {
            "parameters": [P_NAMESPACE],
            "get": _operation("list_namespace_grants", "Grants",
                              "List the grants on a repository namespace (admin).", 200,
                              "GrantList", errors=(400, 403)),
            "post": _operation(
                "add_namespace_grant", "Grants",
                "Grant a privilege on a repository namespace (admin).", 201, "GrantRecord",
                body="Grant", errors=(403, 404, 409),
                description="`use` pulls every repository of the namespace; `manage` also "
                            "pushes, deletes and registers catalogue images there. "
                            'User "*" means every user.'),
        },
        base + "/{user}/{privilege}": {
            "parameters": [P_NAMESPACE, P_GRANTEE, privilege],
            "delete": _operation("revoke_namespace_grant", "Grants",
                                 "Revoke a grant on a repository namespace (admin).", 204,
                                 errors=(400, 403, 404)),
        },
    }


def _jobs() -> dict[str, dict[str, Any]]:
    limits = Limits()
    state = _query_param(
        "state", {"type": "array", "items": _enum(State)},
        "Only jobs in these states (repeat the parameter or separate with commas).",
        style="form", explode=True)
    return {
        "/api/v1/jobs": {
            "get": _operation(
                "list_jobs", "Jobs", "List the jobs you may read, newest first.", 200,
                "JobList", errors=(400,), query=(
                    state,
                    _query_param("owner", schemas.NAME, "Only jobs of this user."),
                    _query_param("limit", {"type": "integer", "minimum": 1,
                                           "maximum": limits.max_page, "default": 100},
                                 "Page size."),
                    _query_param("cursor", STRING,
                                 "`next_cursor` of the previous page (opaque)."),
                    _query_param("id_prefix", {"type": "string", "maxLength": 36,
                                               "pattern": "^-*(?:[0-9a-fA-F]-*){1,32}$"},
                                 "Only jobs whose id starts with these hexadecimal digits "
                                 "(1 to 32; dashes ignored)."),
                    _query_param("restart_of", {"type": "string", "format": "uuid"},
                                 "Only the job that restarted this job."))),
            "post": _operation(
                "enqueue", "Jobs", "Enqueue a job.", 201, "Job", body="JobCreate",
                errors=(403, 409), query=(H_IDEMPOTENCY_KEY,),
                description="`image` is a digest or a catalogue name; a name you may not "
                            "use is 403 (400 if you cannot see it). With an "
                            "`Idempotency-Key`, a retry of the same request by the same "
                            "user within 24 hours answers the first answer (the same job, "
                            "status and body) and creates no job; the key with a "
                            "different body is 409."),
        },
        "/api/v1/jobs/{job_id}": {"parameters": [P_JOB], "get": _operation(
            "show_job", "Jobs", "A job (read).", 200, "Job", errors=(403, 404))},
        "/api/v1/jobs/{job_id}/terminate": {"parameters": [P_JOB], "post": _operation(
            "terminate", "Jobs", "Terminate a job (stop).", 200, "Job", errors=(403, 404),
            description="A queued job terminates at once, an active one starts "
                        "terminating; a terminated job is returned as it is, except that "
                        "a failed job whose host is held (held_until) has its hold "
                        "released.")},
        "/api/v1/jobs/{job_id}/extend": {"parameters": [P_JOB], "post": _operation(
            "extend_job", "Jobs", "Extend a job's deadline, or its held host's hold (manage).",
            200, "Job", body="JobExtend", errors=(403, 404, 409),
            description="Moves the deadline (a queued job's timeout) `by` seconds later; "
                        "the new deadline may lie at most the configured maximum timeout "
                        "from now (400 beyond). A terminating job is 409. Of a terminated "
                        "job whose host is held, moves held_until `by` seconds later, at "
                        "most the configured maximum hold from now (400 beyond); any other "
                        "terminated job, or a hold that has ended, is 409.")},
        "/api/v1/jobs/{job_id}/events": {"parameters": [P_JOB], "get": _operation(
            "job_events", "Jobs", "A job's events (read).", 200, "EventList",
            errors=(400, 403, 404), query=(Q_AFTER,))},
        "/api/v1/jobs/{job_id}/events/watch": {"parameters": [P_JOB], "get": _watch()},
        "/api/v1/jobs/{job_id}/snapshots": {
            "parameters": [P_JOB],
            "get": _operation("job_snapshots", "Jobs", "A job's snapshots (read).", 200,
                              "SnapshotList", errors=(403, 404)),
            "post": _operation(
                "snapshot_job", "Jobs", "Snapshot an ended job's disk as a new image (manage).",
                202, "Snapshot", body="SnapshotCreate", errors=(403, 404, 409),
                description="The job's host uploads the disk the job left (QEMU hosts keep "
                            "it for a while after the end) as a new image named `name`, on "
                            "`store` (default: the job image's first store), and the "
                            "switchboard registers it; poll the snapshot until its `state` "
                            "is `done` (`digest` set) or `failed` (`error`). 409: the job "
                            "has not ended, never ran, or the name is taken."),
        },
        "/api/v1/jobs/{job_id}/snapshots/{snapshot_id}": {
            "parameters": [P_JOB, _path_param("snapshot_id", UUID, "The snapshot's id.")],
            "get": _operation("show_snapshot", "Jobs", "A snapshot of a job (read).", 200,
                              "Snapshot", errors=(400, 403, 404)),
        },
        "/api/v1/jobs/{job_id}/logs/token": {"parameters": [P_JOB], "post": _operation(
            "job_logs_token", "Jobs", "A read token for the job's logs (read).", 200,
            "LogsToken", errors=(403, 404),
            description="The token is a capability token (audience: the log servers' "
                        "service) to read this job's streams on the servers listed.")},
        "/api/v1/jobs/{job_id}/console-token": {"parameters": [P_JOB], "post": _operation(
            "job_console_token", "Jobs",
            "A console token for the job's proxies (read or manage).", 200, "ConsoleToken",
            body="ConsoleTokenRequest", body_required=False, errors=(403, 404),
            description="A capability token (audience: the proxies' service; "
                        "`{type: tunnel, name: <job id>}`) that opens the job's endpoints "
                        "with `auth: token` (docs/proxy.md, Consoles). `access`: `manage` "
                        "(the default; needs manage on the job) types, `read` (needs read) "
                        "watches. Valid for a few minutes; a console stays open after it "
                        "expires.")},
    }


def _watch() -> dict[str, Any]:
    operation = _operation(
        "watch_job", "Jobs", "Follow a job's events as they happen (read).", 200,
        errors=(400, 403, 404), query=(Q_AFTER,),
        description="Server-Sent Events: each event is `id: <seq>`, `event: job` and one "
                    "`data:` line holding an `Event` (see `#/components/schemas/Event`); "
                    "comment lines keep the connection alive. The stream ends after the "
                    "event whose state is `terminated`. A reconnecting `EventSource` "
                    "resumes after its `Last-Event-ID` header (when larger than `after`).")
    operation["parameters"] = [*operation.get("parameters", []), {
        "name": "Last-Event-ID", "in": "header", "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "The last `id` an `EventSource` received: resume after it."}]
    operation["responses"]["200"] = {
        "description": "A stream of job events.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    operation["responses"]["204"] = {
        "description": "With `Last-Event-ID`: the job has ended and every event was sent "
                       "(an `EventSource` stops reconnecting)."}
    return operation


def _other() -> dict[str, dict[str, Any]]:
    return {
        "/healthz": {"get": _operation(
            "healthz", "Other", "Whether the switchboard and its database answer.", 200,
            "Health", errors=(503,), anonymous=True)},
        "/api/v1/openapi.json": {"get": _operation(
            "openapi_document", "Other", "This OpenAPI document.", 200, "OpenAPIDocument",
            anonymous=True)},
        "/.well-known/treadmill/capability-keys": {"get": _operation(
            "capability_keys", "Other",
            "The Ed25519 public keys satellites verify capability tokens with.", 200,
            "CapabilityKeys", anonymous=True)},
        "/api/v1/supervisor": {"get": _supervisor_link()},
        "/api/v1/registry/token": {"get": _registry_token()},
    }


def _audit() -> dict[str, dict[str, Any]]:
    limits = Limits()
    text = {"type": "string", "minLength": 1, "maxLength": 256}
    return {"/api/v1/audit": {"get": _operation(
        "audit_log", "Other", "Audit records you may read, newest first.", 200, "AuditList",
        errors=(400,), query=(
            _query_param("user", text, "Records the user acted in or that name them."),
            _query_param("host", text, "Records about this host."),
            _query_param("job", UUID, "Records about this job."),
            _query_param("image", text, "Records about this catalogue image."),
            _query_param("action", text, "This action, or every action under a prefix "
                                         "(`host` for `host.*`)."),
            _query_param("after", TIME, "Only records after this time (RFC 3339)."),
            _query_param("limit", {"type": "integer", "minimum": 1,
                                   "maximum": limits.max_page, "default": 100}, "Page size."),
            _query_param("cursor", STRING, "`next_cursor` of the previous page (opaque).")),
        description="An admin reads every record; a user those they acted in, those "
                    "naming them (`subject_user`), and those about the jobs, hosts and "
                    "images they may read now.")}}


def _registry_token() -> dict[str, Any]:
    operation = _operation(
        "registry_token", "Other",
        "A capability token for image store access (Docker registry token flow).", 200,
        "RegistryToken", errors=(400, 401, 429), anonymous=True,
        query=({"name": "service", "in": "query", "required": True,
                "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
                "description": "A registered image store's service name (the token's "
                               "audience); 400 for any other."},
               {"name": "scope", "in": "query", "required": False,
                "schema": {"type": "string"},
                "description": "repository:NAME:ACTIONS or registry:catalog:*; repeatable."}),
        description="Credentials are optional: HTTP Basic user:<API token or password>, "
                    "a Bearer API token, or a host token. The token grants the subset of "
                    "the requested access the caller holds.")
    return operation


def _supervisor_link() -> dict[str, Any]:
    operation = _operation(
        "supervisor_link", "Other",
        "The supervisors' WebSocket (protocol treadmill.supervisor.v1).", 200,
        errors=(400, 503),
        description="Authenticated by a host token, not an API token. The messages are "
                    "described in docs/protocol.md and treadmill/protocol/schemas/"
                    "supervisor-v1.json. Beyond `supervisors.max_handshakes` link handshakes "
                    "under way an upgrade waits in a queue; 503 with Retry-After also when "
                    "that queue is full or the upgrade waited `supervisors.handshake_wait` "
                    "seconds.")
    operation["responses"].pop("200")
    operation["responses"]["101"] = {"description": "Switching to the WebSocket protocol."}
    return operation


# -- the document ---------------------------------------------------------------------


def build() -> dict[str, Any]:
    """The OpenAPI 3.1.0 document of the switchboard API (a new, independent dict)."""
    clash = set(schemas.REQUEST_BODIES) & set(RESPONSE_SCHEMAS)
    if clash:
        raise ValueError(f"schema names both request and response: {sorted(clash)}")
    paths: dict[str, dict[str, Any]] = {}
    for part in (_identity(), _hosts(), _images(), _grants(), _namespace_grants(), _jobs(),
                 _other(), _ssh_keys()):
        paths.update(part)
    paths.update(_audit())
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "The switchboard's JSON API. docs/api.md is the reader's guide; "
                           "this document is generated by tools/gen-openapi.",
        },
        "tags": [{"name": name} for name in
                 ("Identity", "Hosts", "Images", "Grants", "Jobs", "Other")],
        "security": [{SECURITY_SCHEME: []}],
        "paths": paths,
        "components": {
            "securitySchemes": {SECURITY_SCHEME: {
                "type": "http", "scheme": "bearer",
                "description": "An API token: `Authorization: Bearer <api token>`.",
            }},
            "schemas": {**schemas.REQUEST_BODIES, **RESPONSE_SCHEMAS},
            "responses": {name: _error_response(status)
                          for status, (name, _) in ERROR_RESPONSES.items()},
        },
    }
    # Fragments are shared (and the API's validators cache the request schemas by
    # identity): give the caller a tree of its own.
    return copy.deepcopy(document)


def render(document: dict[str, Any]) -> str:
    """The text of ``docs/openapi.json``: sorted keys, indent 2, a final newline."""
    return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
