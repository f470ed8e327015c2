"""Repository names, tags and digests, validated before any path is built from them.

The patterns are the OCI distribution specification's (``treadmill.images.oci``), matched
in full.
A valid name has no empty, ``.`` or ``..`` component and no character
outside ``[a-z0-9._/-]``, so it can be joined to a directory safely; a
valid tag cannot start with ``.``; the only digests accepted are
``sha256:`` and 64 lower-case hex digits.
"""

from __future__ import annotations

import re

from treadmill.images.format import is_digest
from treadmill.images.oci import TAG, is_repository
from treadmill.imagestore.errors import OCIError

# Anything shaped like a digest (algorithm:encoded), to tell "a digest we do
# not support" from "a tag".
DIGEST_SHAPE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
UPLOAD_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def check_name(value: str) -> str:
    """The repository name, or ``NAME_INVALID``."""
    if not isinstance(value, str) or not is_repository(value):
        raise OCIError("NAME_INVALID", "invalid repository name")
    return value


def is_tag(value: str) -> bool:
    return TAG.fullmatch(value) is not None


def check_digest(value: str | None) -> str:
    """A ``sha256:<hex>`` digest, or ``DIGEST_INVALID``."""
    if not value:
        raise OCIError("DIGEST_INVALID", "a digest is required")
    if is_digest(value):
        return value
    if DIGEST_SHAPE.fullmatch(value) and not value.startswith("sha256:"):
        raise OCIError("DIGEST_INVALID", "unsupported digest algorithm (only sha256)")
    raise OCIError("DIGEST_INVALID", "invalid digest")


def check_reference(value: str) -> tuple[str | None, str | None]:
    """``(tag, None)`` or ``(None, digest)`` for a manifest reference."""
    if ":" in value:
        return None, check_digest(value)
    if is_tag(value):
        return value, None
    raise OCIError("MANIFEST_INVALID", "invalid tag", status=400)


def check_upload_id(value: str) -> str:
    if not UPLOAD_ID.fullmatch(value):
        raise OCIError("BLOB_UPLOAD_UNKNOWN", "unknown upload")
    return value


def hex_of(digest: str) -> str:
    """The hex part of a validated ``sha256:`` digest."""
    return digest[len("sha256:"):]
