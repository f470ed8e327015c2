"""Secrets the switchboard hands out or checks: API tokens, host tokens, passwords.

Tokens are 32 random bytes, URL-safe base64, with a prefix that says what they
are (``tmu_`` for users, ``tmh_`` for hosts) so that secret scanners and
operators can recognise them. Only their SHA-256 is stored. Passwords are
hashed with scrypt, a memory-hard KDF; hashing runs in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from twisted.internet.threads import deferToThreadPool

USER_TOKEN_PREFIX = "tmu_"
HOST_TOKEN_PREFIX = "tmh_"
TOKEN_BYTES = 32

# scrypt parameters: N=2**15, r=8 needs 32 MiB and ~50 ms per hash.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024


def new_token(prefix: str) -> str:
    """A fresh secret token."""
    raw = secrets.token_bytes(TOKEN_BYTES)
    return prefix + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def token_hash(token: str) -> bytes:
    """What the database stores and looks tokens up by."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def looks_like_token(token: str, prefix: str) -> bool:
    """A cheap shape check before any database work."""
    return token.startswith(prefix) and 20 <= len(token) <= 100 and token.isascii()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password_sync(password: str, *, n: int = SCRYPT_N) -> str:
    """``scrypt$N$r$p$salt$hash`` for ``password``. Blocks: call through a thread."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password_sync(password: str, encoded: str | None) -> bool:
    """Whether ``password`` matches ``encoded``. Blocks: call through a thread."""
    if not encoded:
        # Spend the same time as a real check so that timing does not tell
        # which users have a password.
        hash_password_sync(password)
        return False
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), maxmem=SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


async def hash_password(reactor: Any, password: str) -> str:
    """Hash a password in the reactor's thread pool."""
    return await deferToThreadPool(reactor, reactor.getThreadPool(), hash_password_sync,
                                   password)


async def verify_password(reactor: Any, password: str, encoded: str | None) -> bool:
    """Check a password in the reactor's thread pool."""
    return await deferToThreadPool(reactor, reactor.getThreadPool(), verify_password_sync,
                                   password, encoded)
