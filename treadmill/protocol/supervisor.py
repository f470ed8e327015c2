"""Protocol v1 between the switchboard and supervisors (``docs/protocol.md``).

One WebSocket per supervisor, opened by the supervisor at
``/api/v1/supervisor`` with ``Authorization: Bearer <host token>``. The major
version is the WebSocket subprotocol (``treadmill.supervisor.v1``); the minor
travels in the ``X-Treadmill-Protocol-Minor`` header both ways and the lower
one wins. Every message is a JSON object with a ``type``; the JSON Schema in
``schemas/supervisor-v1.json`` is the authority, and :func:`parse` validates
every received message against it.

Commands carry a ``request_id`` and are answered by an ``ack`` with the same
id. Job events from the supervisor are acknowledged too: a supervisor keeps
an event until its ``ack`` arrives and sends it again after a reconnect, so
no event is lost and (transitions being idempotent) none is applied twice.
Since minor 4 a report the switchboard could not store (its database is
unavailable) is acked ``ok: false`` with the code :data:`UNAVAILABLE`: the
supervisor keeps it and sends it again later.
"""

from __future__ import annotations

import json
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any, Literal, TypedDict

from treadmill.common.messages import check, decode
from treadmill.common.messages import encode as encode  # re-exported: the protocol's encoder

MAJOR = 1
MINOR = 9
"""1: ``JobStart.log_servers``; 2: ``JobStart.proxies`` and ``job_endpoints``;
3: ``snapshot_job`` and ``snapshot_result``; 4: the ack error ``unavailable``;
5: ``JobStart.results``, ``JobStart.ssh_keys``, ``job_endpoints.ssh_host_keys`` and the
endpoints' ``auth``; 6: ``JobStart.hold_on_failure``, ``job_event.held`` and
``status.held``; 7: ``console_event`` (console connections, for the audit log);
8: ``renew_tokens`` (an extended job's fresh tokens) and ``status.job.timeout``;
9: ``renew_tokens.held_for`` (a held job's hold extended) and ``status.held_for`` and
``status.held_timeout``."""
SSH_KEYS_MINOR = 5
"""The minor that brings ``JobStart.ssh_keys`` and ``job_endpoints.ssh_host_keys``."""
ENDPOINT_AUTH_MINOR = 5
"""The minor whose ``job_endpoints`` entries may carry ``auth`` (``service`` or ``token``)."""
SUBPROTOCOL = f"treadmill.supervisor.v{MAJOR}"
MINOR_HEADER = "x-treadmill-protocol-minor"
PATH = "/api/v1/supervisor"
MAX_MESSAGE_BYTES = 256 * 1024

TO_SUPERVISOR = ("start_job", "stop_job", "status_request", "snapshot_job", "renew_tokens",
                 "ack", "protocol_error")
TO_SWITCHBOARD = ("status", "job_event", "job_endpoints", "snapshot_result", "console_event",
                  "ack", "protocol_error")
MESSAGE_TYPES = tuple(sorted(set(TO_SUPERVISOR) | set(TO_SWITCHBOARD)))

UNAVAILABLE = "unavailable"
"""Ack error code (minor 4) for a ``job_event``, ``job_endpoints`` or ``snapshot_result``
the switchboard did not store (its database is unavailable): nothing changed, the
supervisor keeps the report and sends it again later (after a delay, in order)."""
RESULTS_MINOR = 5
"""The first minor version whose ``start_job`` carries ``results`` (console patterns)."""
UNAVAILABLE_MINOR = 4
"""The first minor version that understands :data:`UNAVAILABLE`; to an older supervisor
the switchboard closes the link with ``INTERNAL_ERROR`` instead, and the supervisor
resends its unacknowledged reports after it reconnects."""
KINDS_MINOR = 5
"""The first minor version with ``status.kinds``: the image kinds the host's driver runs."""
HOLD_MINOR = 6
"""The first minor version with ``JobStart.hold_on_failure`` and the ``held`` of
``job_event`` and ``status`` (``docs/jobs.md``, Holding a failed job's host)."""
CONSOLE_MINOR = 7
"""The first minor version with ``console_event``: to an older switchboard the supervisor
sends none (it drops them from its outbox, counted)."""
RENEW_MINOR = 8
"""The first minor version with ``renew_tokens`` and ``status.job.timeout``: an older
supervisor keeps the tokens of its ``start_job`` (``docs/jobs.md``, Reservations)."""
HOLD_RENEW_MINOR = 9
"""The first minor version with ``renew_tokens.held_for`` (a held job's fresh tokens and its
hold's new end) and ``status.held_for`` and ``status.held_timeout`` (what the supervisor
knows of its hold); an older supervisor ends a hold at its first end (``docs/jobs.md``)."""
CONSOLE_EVENT_FIELDS = ("event", "conn_id", "service", "proxy", "user", "jti", "access",
                        "peer", "at", "suppressed")
"""The fields of a ``console_event`` besides ``type``, ``request_id`` and ``job_id``."""
RETRYABLE_ACK_ERRORS = (UNAVAILABLE,)
"""Ack error codes meaning "not stored, send the same report again later"."""

# Why a start_job was refused (ack with ok=false, error.code).
START_ERRORS = ("already_running", "image_not_found", "image_invalid", "bad_request",
                "internal_error")


RESERVATION_PARAMETER = "treadmill.reservation"
"""The ``JobStart`` parameter (``"true"``) by which the switchboard tells a driver to hold
its host until the job's deadline (``docs/jobs.md``, Reservations); users may not set it."""


# -- typed messages (the schema is the authority; a test compares their keys) --------------


class JobImage(TypedDict):
    """``JobStart.image``: the manifest to run and the image stores to fetch it from."""

    digest: str
    name: str | None
    stores: list[str]


class JobParameter(TypedDict):
    value: str
    secret: bool


class ServiceURL(TypedDict):
    """A log server or proxy of ``JobStart``, with the capability token for it."""

    url: str
    token: str


class _JobStartFields(TypedDict):
    id: str
    image: JobImage
    parameters: dict[str, JobParameter]
    timeout: float


class JobStart(_JobStartFields, total=False):
    """The ``job`` of a ``start_job`` command (the four fields above are required)."""

    tags: list[str]
    label: str
    log_servers: list[ServiceURL]  # minor 1
    proxies: list[ServiceURL]  # minor 2
    results: dict[str, str]  # minor 5 (docs/results.md)
    ssh_keys: list[str]  # minor 5
    hold_on_failure: float  # minor 6


class _JobEventFields(TypedDict):
    type: Literal["job_event"]
    request_id: int
    job_id: str
    state: str


class JobEvent(_JobEventFields, total=False):
    """A ``job_event`` report: the job's state now on its host."""

    stage: str
    reason: str
    exit_status: int
    message: str
    held: bool  # minor 6


class CloseCode(IntEnum):
    """WebSocket close codes of protocol v1."""

    NORMAL = 1000
    PROTOCOL_VIOLATION = 4000
    VERSION_MISMATCH = 4001
    SUPERSEDED = 4002
    INTERNAL_ERROR = 4003
    HOST_REMOVED = 4004
    GOING_AWAY = 4005
    """The sender shuts down (1001 is reserved to browsers by Autobahn)."""


class ProtocolError(ValueError):
    """A received message is malformed, unknown or out of place."""


@cache
def schema() -> dict[str, Any]:
    """The protocol's JSON Schema (2020-12)."""
    text = (resources.files("treadmill.protocol") / "schemas" / "supervisor-v1.json"
            ).read_text(encoding="utf-8")
    return json.loads(text)


def validate(message: Any) -> None:
    """Raise :class:`ProtocolError` unless ``message`` is a valid v1 message."""
    check(message, schema(), ProtocolError)


def parse(payload: bytes, *, expect: tuple[str, ...]) -> dict[str, Any]:
    """Decode and validate one received message of one of the ``expect`` types."""
    return decode(payload, expect=expect, max_bytes=MAX_MESSAGE_BYTES, error=ProtocolError,
                  validate=validate)


def negotiate_minor(theirs: str | bytes | None) -> int:
    """The minor version both sides speak: the lower of ours and theirs."""
    if theirs is None:
        return 0
    try:
        value = int(theirs)
    except ValueError:
        raise ProtocolError("the minor version header is not an integer") from None
    if value < 0:
        raise ProtocolError("the minor version header is negative")
    return min(MINOR, value)


# -- constructors: the only places messages are built -------------------------------


def _given(base: Any, /, **optional: Any) -> Any:
    """The message ``base`` (a dict) with each ``optional`` field that is given (not None)."""
    base.update({k: v for k, v in optional.items() if v is not None})
    return base


def start_job(request_id: int, job: JobStart) -> dict[str, Any]:
    """Ask the supervisor to start ``job`` (see ``JobStart`` in the schema)."""
    return {"type": "start_job", "request_id": request_id, "job": job}


def stop_job(request_id: int, job_id: str, reason: str) -> dict[str, Any]:
    return {"type": "stop_job", "request_id": request_id, "job_id": job_id, "reason": reason}


def status_request(request_id: int) -> dict[str, Any]:
    return {"type": "status_request", "request_id": request_id}


def status(request_id: int, job: dict[str, Any] | None,
           kinds: list[str] | None = None, held: str | None = None, *,
           held_for: float | None = None, held_timeout: float | None = None) -> dict[str, Any]:
    """What the supervisor runs: ``None`` when idle, else ``{id, state, stage}``;
    ``kinds`` (minor 5, optional): the image kinds its driver runs (absent: any);
    ``held`` (minor 6, optional): the ended job whose host it still keeps, and (minor 9,
    with it) ``held_for``, the seconds its hold has left, and ``held_timeout``, the held
    job's timeout, as the supervisor knows them."""
    message: dict[str, Any] = {"type": "status", "request_id": request_id, "job": job}
    _given(message, kinds=sorted(kinds) if kinds is not None else None, held=held)
    if held is not None:
        _given(message, held_for=held_for, held_timeout=held_timeout)
    return message


def job_event(request_id: int, job_id: str, state: str, *, stage: str | None = None,
              reason: str | None = None, exit_status: int | None = None,
              message: str | None = None, held: bool = False) -> JobEvent:
    event: JobEvent = {"type": "job_event", "request_id": request_id, "job_id": job_id,
                       "state": state}
    return _given(event, stage=stage, reason=reason, exit_status=exit_status,
                  message=message, held=True if held else None)


def job_endpoints(request_id: int, job_id: str, endpoints: list[dict[str, Any]], *,
                  ssh_host_keys: list[str] | None = None) -> dict[str, Any]:
    """The job's public endpoints now (the whole list; empty when none), and the
    guest's SSH host keys if known (minor 5)."""
    message: dict[str, Any] = {"type": "job_endpoints", "request_id": request_id,
                               "job_id": job_id, "endpoints": endpoints}
    if ssh_host_keys:
        message["ssh_host_keys"] = ssh_host_keys
    return message


def snapshot_job(request_id: int, snapshot_id: str, job_id: str, repository: str,
                 store: str) -> dict[str, Any]:
    """Upload the disk ended job ``job_id`` left as a new image in ``repository`` on ``store``."""
    return {"type": "snapshot_job", "request_id": request_id, "snapshot_id": snapshot_id,
            "job_id": job_id, "repository": repository, "store": store}


def snapshot_result(request_id: int, snapshot_id: str, job_id: str, *,
                    digest: str | None = None,
                    error: tuple[str, str] | None = None) -> dict[str, Any]:
    """How a ``snapshot_job`` ended: the new manifest's ``digest``, or ``error``."""
    message: dict[str, Any] = {"type": "snapshot_result", "request_id": request_id,
                               "snapshot_id": snapshot_id, "job_id": job_id}
    if error is not None:
        message["error"] = {"code": error[0], "message": error[1][:1024]}
    else:
        message["digest"] = digest
    return message


def console_event(request_id: int, job_id: str, **fields: Any) -> dict[str, Any]:
    """A console client of job ``job_id`` opened or closed (minor 7): ``fields`` are those of
    :data:`CONSOLE_EVENT_FIELDS` (``proxy``, ``jti`` and ``suppressed`` optional)."""
    unknown = set(fields) - set(CONSOLE_EVENT_FIELDS)
    if unknown:
        raise TypeError(f"unknown console_event fields: {sorted(unknown)}")
    return _given({"type": "console_event", "request_id": request_id, "job_id": job_id},
                  **fields)


def renew_tokens(request_id: int, job_id: str, timeout: float, *,
                 log_servers: list[ServiceURL] | None = None,
                 proxies: list[ServiceURL] | None = None,
                 held_for: float | None = None) -> dict[str, Any]:
    """Job ``job_id``'s ``timeout`` grew (minor 8), or its hold did (``held_for``, minor 9:
    the held job's hold now ends that many seconds from now): the tokens of its
    ``start_job`` for its log servers and proxies, replaced by fresh ones that outlive its
    new end."""
    return _given({"type": "renew_tokens", "request_id": request_id, "job_id": job_id,
                   "timeout": timeout}, held_for=held_for, log_servers=log_servers or None,
                  proxies=proxies or None)


def ack(request_id: int, error: tuple[str, str] | None = None) -> dict[str, Any]:
    """Answer request ``request_id``: ``ok``, or ``ok: false`` with ``error`` (code, text)."""
    if error is None:
        return {"type": "ack", "request_id": request_id, "ok": True}
    code, text = error
    return {"type": "ack", "request_id": request_id, "ok": False,
            "error": {"code": code, "message": text[:1024]}}


def unavailable(request_id: int) -> dict[str, Any]:
    """The retryable negative ack (minor 4): the report was not stored, send it again later."""
    return ack(request_id, (UNAVAILABLE, "the switchboard cannot store reports now; "
                                         "send this one again later"))


def is_retryable(message: dict[str, Any]) -> bool:
    """Whether an ``ack`` asks for the same report to be sent again later."""
    error = message.get("error") or {}
    return not message.get("ok") and error.get("code") in RETRYABLE_ACK_ERRORS


def protocol_error(code: str, text: str) -> dict[str, Any]:
    return {"type": "protocol_error", "code": code, "message": text[:1024]}
