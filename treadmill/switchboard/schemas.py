"""JSON Schemas (2020-12) of the switchboard API's request bodies.

The API validates every body against these, and ``tools/gen-openapi`` puts
the same schemas into ``docs/openapi.json``, so the document cannot drift.
"""

from __future__ import annotations

from typing import Any

from treadmill.protocol.results import PATTERNS_SCHEMA

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Slash-separated segments; no segment may be "grants" (it names the grant routes),
# nor a last segment "history" or "rollback" in any case (the history routes).
IMAGE_NAME_PATTERN = (r"^(?!(.*/)?grants(/|$))"
                      r"(?!.*/([Hh][Ii][Ss][Tt][Oo][Rr][Yy]|[Rr][Oo][Ll][Ll][Bb][Aa][Cc][Kk])$)"
                      r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:=/+-]{0,127}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
PARAMETER_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"

MAX_TTL = 365 * 24 * 3600

NAME: dict[str, Any] = {"type": "string", "pattern": NAME_PATTERN}
USER_OR_EVERYONE: dict[str, Any] = {"type": "string",
                                    "pattern": r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,62})$"}
IMAGE_NAME: dict[str, Any] = {"type": "string", "maxLength": 128, "pattern": IMAGE_NAME_PATTERN}
DIGEST: dict[str, Any] = {"type": "string", "pattern": DIGEST_PATTERN}
TEXT: dict[str, Any] = {"type": "string", "maxLength": 256,
                        "pattern": r"^[^\x00-\x1f\x7f-\x9f]*$", "x-printable": True,
                        "description": "At most 256 printable characters: no control, "
                        "format (bidirectional overrides, zero-width characters), "
                        "private-use or line and paragraph separator characters."}
TAGS: dict[str, Any] = {"type": "array", "maxItems": 64, "uniqueItems": True,
                        "items": {"type": "string", "pattern": TAG_PATTERN}}
PASSWORD: dict[str, Any] = {"type": "string", "minLength": 8, "maxLength": 1024}
STORE_URL: dict[str, Any] = {"type": "string", "maxLength": 2048,
                             "pattern": r"^https?://[^\s/?#]+[^\s]*$"}
TTL: dict[str, Any] = {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_TTL}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


LOGIN = _object({"user": NAME, "password": {"type": "string", "maxLength": 1024},
                 "label": TEXT, "expires_in": TTL}, ("user", "password"))
TOKEN_CREATE = _object({"label": TEXT, "expires_in": TTL, "user": NAME})
USER_CREATE = _object({"name": NAME, "admin": {"type": "boolean"}, "password": PASSWORD},
                      ("name",))
USER_UPDATE = _object({"admin": {"type": "boolean"}, "disabled": {"type": "boolean"},
                       "password": PASSWORD})
HOST_CREATE = _object({"name": NAME, "tags": TAGS, "owner": NAME, "description": TEXT},
                      ("name",))
HOST_TAGS = _object({"tags": TAGS}, ("tags",))
IMAGE_KIND: dict[str, Any] = {"enum": ["qemu", "board"]}
IMAGE_CREATE = _object({
    "name": IMAGE_NAME, "digest": DIGEST, "description": TEXT, "host_tags": TAGS,
    "results": {"oneOf": [{"type": "null"}, PATTERNS_SCHEMA]},
    "kind": IMAGE_KIND,
    "stores": {"type": "array", "maxItems": 16, "uniqueItems": True, "items": STORE_URL},
}, ("name", "digest", "stores"))
SNAPSHOT_CREATE = _object({
    "name": IMAGE_NAME, "store": STORE_URL, "description": TEXT,
}, ("name",))
IMAGE_UPDATE = _object({
    "digest": DIGEST, "description": TEXT, "host_tags": TAGS, "kind": IMAGE_KIND,
    "results": {"oneOf": [{"type": "null"}, PATTERNS_SCHEMA]},
    "stores": {"type": "array", "maxItems": 16, "uniqueItems": True, "items": STORE_URL},
})
CONSOLE_TOKEN = _object({"access": {"enum": ["read", "manage"]}})
IMAGE_ROLLBACK = _object({"version": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}},
                         ("version",))
SERVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
STORE_CREATE = _object({
    "url": STORE_URL, "service": {"type": "string", "pattern": SERVICE_PATTERN},
    "description": TEXT, "cache": {"type": "boolean"},
}, ("url", "service"))
GRANT = _object({"user": USER_OR_EVERYONE, "privilege": {"type": "string",
                 "enum": ["read", "start", "stop", "use", "manage"]}}, ("user", "privilege"))
PARAMETER = _object({
    "value": {"type": "string", "maxLength": 4096, "pattern": r"^[^\x00]*$"},
    "secret": {"type": "boolean"},
}, ("value",))
JOB_CREATE = _object({
    "image": {"type": "string", "maxLength": 128,
              "anyOf": [{"pattern": DIGEST_PATTERN}, {"pattern": IMAGE_NAME_PATTERN}]},
    "tags": TAGS,
    "parameters": {"type": "object", "maxProperties": 64,
                   "propertyNames": {"pattern": PARAMETER_NAME_PATTERN},
                   "additionalProperties": PARAMETER},
    "timeout": {"type": "number", "minimum": 1},
    "queue_timeout": {"type": "number", "minimum": 1},
    "max_restarts": {"type": "integer", "minimum": 0, "maximum": 100},
    "label": TEXT,
    "results": PATTERNS_SCHEMA,
    "reservation": {"type": "boolean"},
    "hold_on_failure": {"type": "number", "exclusiveMinimum": 0},
})  # image: required but for a reservation on a switchboard with jobs.reservation_image
HEALTH_CHECK = _object({
    "image": JOB_CREATE["properties"]["image"],
    "parameters": JOB_CREATE["properties"]["parameters"],
    "expect_exit": {"type": "integer", "minimum": 0, "maximum": 255},
    "timeout": {"type": "number", "minimum": 1, "maximum": 7 * 24 * 3600},
    "every_jobs": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "every_hours": {"type": "number", "exclusiveMinimum": 0, "maximum": 24 * 365},
    "after_failures": {"type": "integer", "minimum": 1, "maximum": 1000},
}, ("image",))
JOB_EXTEND = _object({"by": {"type": "number", "exclusiveMinimum": 0,
                             "maximum": 10 * 365 * 24 * 3600}}, ("by",))

SSH_KEY_CREATE = _object({"key": {"type": "string", "minLength": 1, "maxLength": 8192}},
                         ("key",))

REQUEST_BODIES: dict[str, dict[str, Any]] = {
    "Login": LOGIN, "TokenCreate": TOKEN_CREATE, "UserCreate": USER_CREATE,
    "UserUpdate": USER_UPDATE, "HostCreate": HOST_CREATE, "HostTags": HOST_TAGS,
    "ImageCreate": IMAGE_CREATE, "ImageUpdate": IMAGE_UPDATE, "Grant": GRANT,
    "ImageRollback": IMAGE_ROLLBACK,
    "JobCreate": JOB_CREATE, "SnapshotCreate": SNAPSHOT_CREATE, "StoreCreate": STORE_CREATE,
    "SshKeyCreate": SSH_KEY_CREATE,
    "ConsoleTokenRequest": CONSOLE_TOKEN,
    "JobExtend": JOB_EXTEND,
    "HealthCheckSet": HEALTH_CHECK,
}
"""Every request body schema by the name ``docs/openapi.json`` gives it."""
