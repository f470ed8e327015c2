"""OpenSSH public keys: strict parsing and SHA256 fingerprints.

Users register keys with the switchboard (``docs/api.md``, "SSH keys") and
guests report their host keys through the agent channel (``docs/agent.md``):
both are ``TYPE BASE64 [COMMENT]`` lines. :func:`parse` accepts only the key
types worth trusting, checks that the body decodes, that its embedded type
matches, that it is a valid key of that type (RSA at least 2048 bits), and
returns a canonical form. It never echoes a key back in an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import unicodedata
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from treadmill.common.schema import HIDDEN_CATEGORIES

MAX_LINE = 8192
"""Longest accepted key line (an RSA 16384-bit key is about 2.8 KB)."""
MAX_COMMENT = 256
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
         "ssh-rsa")
_HIDDEN = HIDDEN_CATEGORIES
"""Unicode categories a comment may not hold (a listing would show another text than it
holds)."""


class BadKey(ValueError):
    """The text is not an acceptable SSH public key; the message says why."""


@dataclass(frozen=True)
class PublicKey:
    """One parsed public key."""

    type: str
    body: str
    """The base64 body (canonical: it is the only encoding accepted)."""
    comment: str
    fingerprint: str
    """``SHA256:`` and the unpadded base64 of the blob's SHA-256, as ``ssh-keygen -l``."""
    bits: int

    @property
    def line(self) -> str:
        """The ``authorized_keys`` / ``known_hosts`` form, without the comment."""
        return f"{self.type} {self.body}"


def fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _strings(blob: bytes) -> list[bytes]:
    """The SSH wire-format strings ``blob`` is made of; raises BadKey if it is not."""
    out, at = [], 0
    while at < len(blob):
        if len(blob) - at < 4:
            raise BadKey("the key body is truncated")
        (size,) = struct.unpack(">I", blob[at:at + 4])
        at += 4
        if size > len(blob) - at:
            raise BadKey("the key body is truncated")
        out.append(blob[at:at + size])
        at += size
    return out


def parse(text: str, *, comment_allowed: bool = True) -> PublicKey:
    """Parse one public key line, or raise :class:`BadKey`."""
    if not isinstance(text, str):
        raise BadKey("a key is a string")
    text = text.strip()
    if not text:
        raise BadKey("the key is empty")
    if len(text) > MAX_LINE:
        raise BadKey(f"the key is longer than {MAX_LINE} characters")
    if "\n" in text or "\r" in text:
        raise BadKey("a key is one line")
    parts = text.split(None, 2)
    if len(parts) < 2:
        raise BadKey("a key is 'TYPE BASE64 [COMMENT]'")
    kind, body = parts[0], parts[1]
    comment = parts[2].strip() if len(parts) == 3 else ""
    if kind not in TYPES:
        raise BadKey(f"the key type must be one of {', '.join(TYPES)}")
    if comment and not comment_allowed:
        raise BadKey("no comment is allowed here")
    if len(comment) > MAX_COMMENT or any(unicodedata.category(c) in _HIDDEN for c in comment):
        raise BadKey(f"the comment must be printable and at most {MAX_COMMENT} characters")
    try:
        blob = base64.b64decode(body.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BadKey("the key body is not valid base64") from None
    if base64.b64encode(blob).decode() != body:
        raise BadKey("the key body is not canonical base64")
    fields = _strings(blob)
    if not fields or fields[0] != kind.encode():
        raise BadKey("the key body's embedded type does not match its type")
    expected = {"ssh-ed25519": 2, "ssh-rsa": 3}.get(kind, 3)
    if len(fields) != expected:
        raise BadKey("the key body does not hold a key of its type")
    if kind.startswith("ecdsa-sha2-") and fields[1] != kind.removeprefix("ecdsa-sha2-").encode():
        raise BadKey("the key body's curve does not match its type")
    if kind == "ssh-ed25519" and len(fields[1]) != 32:
        raise BadKey("an Ed25519 key is 32 bytes")
    try:
        key = load_ssh_public_key(f"{kind} {body}".encode())
    except (ValueError, UnsupportedAlgorithm):
        raise BadKey("the key body does not hold a valid key of its type") from None
    bits = getattr(key, "key_size", 256)
    if isinstance(key, rsa.RSAPublicKey) and not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise BadKey(f"an RSA key must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
    return PublicKey(type=kind, body=body, comment=comment,
                     fingerprint=fingerprint(blob), bits=bits)
