"""The proxy's wire formats (``docs/proxy.md``): the control protocol and the data header.

Control: one WebSocket per job and proxy, opened by the supervisor at
``/v1/control`` with ``Authorization: Bearer <capability token>`` (a
``tunnel``/``publish`` grant on the job) and subprotocol
``treadmill.proxy.v1``. Every message is a JSON object with a ``type`` in a
text frame; ``schemas/proxy-control-v1.json`` is the authority and
:func:`parse` validates every received message against it. The constructors
below are the only places messages are built.

Data: when a client arrives on a published port or path the proxy sends
``connect {conn_id, service}``; the supervisor opens a plain TCP (or TLS)
connection to the proxy's data port and sends one line,
:func:`data_header`: ``TREADMILL-DATA/1 <conn_id> <token>\\n``. From the
next byte on the connection carries the client's bytes both ways.

Pool (minor 2): a proxy whose ``welcome`` names ``pool`` accepts that many idle
data connections from the job ahead of its clients. Each starts with
:func:`pool_header`, ``TREADMILL-POOL/1 <job> <token>\\n``, and waits; when a
client arrives the proxy writes :func:`join_line`, ``TREADMILL-JOIN/1
<service>\\n``, on one of them and joins it to the client at once (no ``connect``
round trip); the supervisor dials the service and relays.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from treadmill.common.messages import check, decode
from treadmill.common.messages import encode as encode  # re-exported: the protocol's encoder

__all__ = [
    "CONTROL_PATH",
    "DATA_MAGIC",
    "JOIN_MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "POOL_MAGIC",
    "SUBPROTOCOL",
    "TO_PROXY",
    "TO_SUPERVISOR",
    "CloseCode",
    "ConsoleCloseCode",
    "ProtocolError",
    "data_header",
    "join_line",
    "parse",
    "parse_data_header",
    "parse_join_line",
    "parse_pool_header",
    "parse_proxy_url",
    "pool_header",
]

MAJOR = 1
SUBPROTOCOL = f"treadmill.proxy.v{MAJOR}"
CONTROL_PATH = "/v1/control"
TUNNEL_PREFIX = "/v1/tunnels/"
MAX_MESSAGE_BYTES = 64 * 1024

TO_PROXY = ("publish", "unpublish", "connect_failed", "protocol_error")
TO_SUPERVISOR = ("welcome", "published", "unpublished", "connect", "console", "error",
                 "protocol_error")

MINOR = 2
"""The control protocol's minor version: 1 brings ``console`` (console clients opened and
closed, for the audit log), 2 the dial-back pool (``welcome.pool``, pooled data
connections). The supervisor announces its minor in :data:`MINOR_HEADER` on the upgrade
request; the proxy sends ``console`` only to one that announced 1 or more and
``welcome.pool`` only to one that announced 2 or more (an older supervisor would take
either for a violation), and answers with its own minor."""
MINOR_HEADER = "x-treadmill-proxy-minor"
CONSOLE_MINOR = 1
"""The first minor with the ``console`` message."""
POOL_MINOR = 2
"""The first minor with the dial-back pool: ``welcome.pool`` and pooled data connections."""
MAX_POOL = 4096
"""The largest ``welcome.pool`` (the schema's bound)."""

ERROR_CODES = ("ports_exhausted", "port_unavailable", "too_many_tunnels", "bad_request",
               "not_published", "internal_error")

DATA_MAGIC = b"TREADMILL-DATA/1"
MAX_HEADER_BYTES = 9 * 1024  # the magic, a conn_id (or job) and a token of at most 8 KiB
POOL_MAGIC = b"TREADMILL-POOL/1"
JOIN_MAGIC = b"TREADMILL-JOIN/1"
MAX_JOIN_BYTES = 128  # the join line: the magic and a service
_CONN_ID = re.compile(rb"[A-Za-z0-9_-]{16,64}")
_JOB = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SERVICE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")


class CloseCode(IntEnum):
    """WebSocket close codes of the control connection."""

    NORMAL = 1000
    """Sent by the supervisor: the job ended, close its tunnels now (no grace)."""
    PROTOCOL_VIOLATION = 4000
    SUPERSEDED = 4002
    """A newer control connection of the same job took over."""
    GOING_AWAY = 4005
    """The sender shuts down; the tunnels are kept for the grace period."""


class ConsoleCloseCode(IntEnum):
    """WebSocket close codes of a tunnel path that needs a console token."""

    UNAUTHORIZED = 4401
    """No token within ``connect_timeout``, a token or renewal that does not verify
    (malformed, expired, wrong audience, unknown key, bad signature), or the token's
    ``exp`` plus ``console_grace`` passed without a renewal."""
    FORBIDDEN = 4403
    """A valid token that grants neither ``read`` nor ``manage`` on this job, or a
    renewal of another user."""
    BUSY = 4429
    """The tunnel has ``max_connections_per_tunnel`` clients (waiting for their token
    included): try again later."""


class ProtocolError(ValueError):
    """A received message is malformed, unknown or out of place."""


@cache
def schema() -> dict[str, Any]:
    """The control protocol's JSON Schema (2020-12)."""
    text = (resources.files("treadmill.protocol") / "schemas" / "proxy-control-v1.json"
            ).read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _type_schemas() -> dict[str, dict[str, Any]]:
    """Per message type, the part of the schema its ``if``/``then`` selects (a message
    checked against it alone is checked exactly as against the whole schema, ~4x faster:
    a ``connect`` per client connection is on the hot path)."""
    full = schema()
    found = {}
    for rule in full["allOf"]:
        kind = rule["if"]["properties"]["type"]["const"]
        found[kind] = {"$schema": full["$schema"], "$defs": full["$defs"],
                       "$ref": rule["then"]["$ref"]}
    return found


_CONNECT_KEYS = frozenset(("type", "conn_id", "service"))
_CONN_ID_TEXT = re.compile(r"[A-Za-z0-9_-]{16,64}")
_SERVICE_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _valid_connect(message: dict[str, Any]) -> bool:
    """A ``connect`` that the schema accepts, checked by hand (~100x faster than the
    schema: one per client connection, on the setup path). False sends it to the schema,
    which names what is wrong; ``tests/protocol`` checks that both agree."""
    if message.keys() != _CONNECT_KEYS:
        return False
    conn_id, service = message["conn_id"], message["service"]
    return (type(conn_id) is str and type(service) is str
            and _CONN_ID_TEXT.fullmatch(conn_id) is not None
            and _SERVICE_TEXT.fullmatch(service) is not None)


def validate(message: Any) -> None:
    """Raise :class:`ProtocolError` unless ``message`` is a valid v1 message."""
    if isinstance(message, dict) and message.get("type") == "connect" \
            and _valid_connect(message):
        return
    kind = message.get("type") if isinstance(message, dict) else None
    part = _type_schemas().get(kind) if isinstance(kind, str) else None
    check(message, part if part is not None else schema(), ProtocolError)


def parse(payload: bytes, *, expect: tuple[str, ...]) -> dict[str, Any]:
    """Decode and validate one received message of one of the ``expect`` types."""
    return decode(payload, expect=expect, max_bytes=MAX_MESSAGE_BYTES, error=ProtocolError,
                  validate=validate)


def parse_proxy_url(url: str) -> tuple[bool, str, int, str]:
    """``(secure, host, port, base)`` of a proxy URL (``ws``, ``wss``, ``http``, ``https``);
    ``base`` is the ``ws(s)://host:port`` prefix of its WebSocket URLs."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws://, wss://, http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    secure = scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return secure, host, port, f"{scheme}://{shown}:{port}{parts.path.rstrip('/')}"


# -- the data connection's first line ------------------------------------------------


def _header(magic: bytes, name: str, token: str) -> bytes:
    return b"%s %s %s\n" % (magic, name.encode("ascii"), token.encode("ascii"))


def _parse_header(line: bytes, magic: bytes, name: re.Pattern[bytes]) -> tuple[str, str]:
    parts = line.rstrip(b"\r").split(b" ")
    kind = magic.decode("ascii")
    if len(parts) != 3 or parts[0] != magic:
        raise ProtocolError(f"not a {kind} header")
    if not name.fullmatch(parts[1]) or not _TOKEN.fullmatch(parts[2]):
        raise ProtocolError(f"malformed {kind} header")
    return parts[1].decode("ascii"), parts[2].decode("ascii")


def data_header(conn_id: str, token: str) -> bytes:
    """The line a supervisor sends first on a data connection."""
    return _header(DATA_MAGIC, conn_id, token)


def parse_data_header(line: bytes) -> tuple[str, str]:
    """``(conn_id, token)`` of a data header line (without its ``\\n``)."""
    return _parse_header(line, DATA_MAGIC, _CONN_ID)


def pool_header(job: str, token: str) -> bytes:
    """The line a supervisor sends first on a pooled data connection (minor 2)."""
    return _header(POOL_MAGIC, job, token)


def parse_pool_header(line: bytes) -> tuple[str, str]:
    """``(job, token)`` of a pool header line (without its ``\\n``)."""
    return _parse_header(line, POOL_MAGIC, _JOB)


def join_line(service: str) -> bytes:
    """The line the proxy writes on a pooled data connection it joins to a client."""
    return b"%s %s\n" % (JOIN_MAGIC, service.encode("ascii"))


def parse_join_line(line: bytes) -> str:
    """The service of a join line (without its ``\\n``)."""
    parts = line.split(b" ")
    if len(parts) != 2 or parts[0] != JOIN_MAGIC or not _SERVICE.fullmatch(parts[1]):
        raise ProtocolError("not a TREADMILL-JOIN/1 line")
    return parts[1].decode("ascii")


# -- constructors --------------------------------------------------------------------


def welcome(job: str, data_port: int, data_tls: bool, public_host: str, grace: float,
            published: list[str], pool: int | None = None) -> dict[str, Any]:
    """``pool`` (minor 2): how many idle pooled data connections the proxy accepts from
    the job; only for a supervisor that announced minor 2 or more."""
    message: dict[str, Any] = {"type": "welcome", "job": job, "data_port": data_port,
                               "data_tls": data_tls, "public_host": public_host,
                               "grace": grace, "published": published}
    if pool is not None:
        message["pool"] = pool
    return message


def publish(request_id: int, service: str, *, tcp: bool = True, websocket: bool = True,
            authenticates: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "publish", "request_id": request_id,
                               "service": service, "tcp": tcp, "websocket": websocket}
    if authenticates:
        message["authenticates"] = True
    return message


def published(request_id: int, service: str, host: str, *, tcp_port: int | None = None,
              ws_path: str | None = None, ws_url: str | None = None,
              auth: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "published", "request_id": request_id,
                               "service": service, "host": host}
    for key, value in (("tcp_port", tcp_port), ("ws_path", ws_path), ("ws_url", ws_url),
                       ("auth", auth)):
        if value is not None:
            message[key] = value
    return message


def unpublish(request_id: int, service: str) -> dict[str, Any]:
    return {"type": "unpublish", "request_id": request_id, "service": service}


def unpublished(request_id: int, service: str) -> dict[str, Any]:
    return {"type": "unpublished", "request_id": request_id, "service": service}


def connect(conn_id: str, service: str) -> dict[str, Any]:
    return {"type": "connect", "conn_id": conn_id, "service": service}


def connect_failed(conn_id: str, message: str = "") -> dict[str, Any]:
    return {"type": "connect_failed", "conn_id": conn_id, "message": message[:1024]}


def error(request_id: int, code: str, message: str,
          service: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "request_id": request_id, "code": code,
                            "message": message[:1024]}
    if service is not None:
        body["service"] = service
    return body


def console(event: str, conn_id: str, service: str, subject: str, access: str, peer: str,
            at: float, jti: str | None = None) -> dict[str, Any]:
    """A console client of ``service`` opened (``event`` ``opened``: its token verified) or
    closed; ``subject``, ``jti`` and ``access`` are its token's, ``peer`` its address."""
    message: dict[str, Any] = {"type": "console", "event": event, "conn_id": conn_id,
                               "service": service, "subject": subject[:128],
                               "access": access, "peer": peer[:200], "at": at}
    if jti:
        message["jti"] = jti[:128]
    return message


def negotiate_minor(theirs: str | bytes | None) -> int:
    """The control protocol minor both sides speak: the lower of ours and theirs (0 when
    absent or malformed: an older supervisor)."""
    try:
        value = int(theirs) if theirs is not None else 0
    except ValueError:
        return 0
    return max(0, min(MINOR, value))


def protocol_error(text: str) -> dict[str, Any]:
    return {"type": "protocol_error", "code": "violation", "message": text[:1024]}
