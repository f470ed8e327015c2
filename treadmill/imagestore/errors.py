"""OCI distribution errors: ``{"errors": [{"code", "message", "detail"}]}``."""

from __future__ import annotations

import json
from typing import Any

#: The error codes of the OCI distribution specification, with their usual status.
CODES: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "UNKNOWN": 500,
    # Treadmill extensions (the image cache, docs/imagestore.md).
    "UNAVAILABLE": 503,
    "REQUEST_INVALID": 400,
    "LEASE_UNKNOWN": 404,
    "LEASE_CONFLICT": 409,
    "REPLICATION_UNKNOWN": 404,
}


class OCIError(Exception):
    """An error answered in the OCI shape.

    ``headers`` are added to the response (``WWW-Authenticate``,
    ``Content-Range``...). Messages never quote a token.
    """

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 detail: Any = None, headers: dict[str, str] | None = None):
        if code not in CODES:
            raise ValueError(f"unknown OCI error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else CODES[code]
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)

    def __repr__(self) -> str:
        return f"OCIError({self.code!r}, {self.message!r}, status={self.status})"


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]},
                      separators=(",", ":")).encode("utf-8")
