"""Capability tokens: short-lived, narrowly scoped grants signed by the switchboard.

The switchboard holds an Ed25519 private key and signs JWTs (``alg: EdDSA``)
that say who may do what to which object until when. Satellite servers (image
stores, log servers, proxies) hold only the public keys, as a JWKS fetched from
``GET /.well-known/treadmill/capability-keys`` or as a file, and verify tokens
offline: they never call the switchboard to authorise a request.

A token's claims use the Docker registry token shape, so that an OCI registry
token flow can reuse it::

    {"iss": "treadmill", "sub": "alice", "aud": "imagestore",
     "iat": 1700000000, "nbf": 1700000000, "exp": 1700000300,
     "jti": "…", "access": [{"type": "repository", "name": "lab/fw",
                              "actions": ["pull"]}]}

Time always comes from an ``IReactorTime`` (``clock.seconds()``), never from
the system clock directly, so that tests run under
``twisted.internet.task.Clock``. PyJWT checks only the signature here; the
time, issuer and audience checks are done by :class:`CapabilityVerifier`
against its clock. See ``docs/capabilities.md`` for the format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from treadmill.common.files import write_atomically

__all__ = [
    "ALGORITHM",
    "MAX_TTL",
    "REASONS",
    "Access",
    "CapabilityError",
    "CapabilityKeyError",
    "CapabilitySigner",
    "CapabilityVerifier",
    "Claims",
    "bearer_token",
    "key_id",
    "load_or_create_signing_key",
    "load_public_keys",
    "parse_jwks",
    "public_jwk",
]

log = Logger()

#: The only JWS algorithm signed or accepted.
ALGORITHM = "EdDSA"

#: The longest lifetime :meth:`CapabilitySigner.sign` accepts, in seconds: eight days,
#: so that a job's log write token (its timeout plus an hour) covers the longest job.
MAX_TTL = 8 * 24 * 60 * 60.0

#: Tokens longer than this are rejected as malformed before any parsing.
MAX_TOKEN_LENGTH = 8192

#: Every value :attr:`CapabilityError.reason` can take.
REASONS = frozenset(
    {
        "malformed",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "insufficient_scope",
    }
)

# Claims set by the signer; ``extra`` may not override them.
_RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "access"})

# RFC 6750 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----",
    re.DOTALL,
)


class CapabilityKeyError(ValueError):
    """A capability key file or key set cannot be used (unreadable, corrupt, wrong type)."""


class CapabilityError(Exception):
    """A capability token was refused.

    :ivar reason: a short code, one of :data:`REASONS`, fit for logs and for an
        error body. The message never contains the token.
    """

    def __init__(self, reason: str, message: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown capability error reason {reason!r}")
        self.reason = reason
        self.message = message or reason.replace("_", " ")
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"CapabilityError({self.reason!r}, {self.message!r})"


# -- keys -------------------------------------------------------------------


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the stable id (``kid``) of a public key.

    The first 16 hex digits of the SHA-256 of the 32 raw public key bytes.
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError(f"expected an Ed25519PublicKey, got {type(public_key).__name__}")
    return hashlib.sha256(_raw_public_bytes(public_key)).hexdigest()[:16]


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """Return the public key as a JWK (RFC 8037 ``OKP``/``Ed25519``) with its ``kid``."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url_encode(_raw_public_bytes(public_key)),
        "kid": key_id(public_key),
        "alg": ALGORITHM,
        "use": "sig",
    }


def load_or_create_signing_key(path: str) -> Ed25519PrivateKey:
    """Load the switchboard's Ed25519 signing key, creating it on first use.

    The file is a PEM (PKCS#8, unencrypted) private key. If it does not exist,
    a new key is generated and written atomically: a temporary file in the
    same directory (mode 0600), fsync, ``os.replace``, fsync of the directory.
    The directory must exist.

    :raises CapabilityKeyError: naming *path*, if the file cannot be read or
        written, or does not hold an unencrypted Ed25519 private key.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        return _create_signing_key(path)
    except OSError as e:
        raise CapabilityKeyError(
            f"{path}: cannot read capability signing key: {e.strerror or e}"
        ) from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn(
            "capability signing key {path} is accessible to group or others "
            "(mode {mode:o}); it should be 0600",
            path=path,
            mode=stat.S_IMODE(mode),
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise CapabilityKeyError(
            f"{path}: capability signing key is encrypted; an unencrypted PKCS#8 PEM "
            "Ed25519 key is required"
        ) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CapabilityKeyError(
            f"{path}: not a PEM private key (expected an Ed25519 PKCS#8 PEM key)"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise CapabilityKeyError(
            f"{path}: capability signing key is {type(key).__name__}, not Ed25519"
        )
    return key


def _create_signing_key(path: str) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_atomically(path, pem, exclusive=True)
    except FileExistsError:
        return load_or_create_signing_key(path)  # another process created it first
    except OSError as e:
        raise CapabilityKeyError(
            f"{path}: cannot create capability signing key: {e.strerror or e}"
        ) from e
    log.info(
        "created capability signing key {path} (kid {kid})",
        path=path,
        kid=key_id(key.public_key()),
    )
    return key


def parse_jwks(obj: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """Return the Ed25519 verification keys of a JWKS (``{"keys": [...]}``) by ``kid``.

    Keys of another type or curve, or marked for another use or algorithm, are
    skipped (RFC 7517 §5). A key without ``kid`` gets :func:`key_id`. Private
    key material, a malformed Ed25519 key, two different keys with one
    ``kid``, or no usable key at all is an error.

    :raises CapabilityKeyError: if the key set cannot be used.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("keys"), list):
        raise CapabilityKeyError('a JWKS must be a JSON object with a "keys" array')
    keys: dict[str, Ed25519PublicKey] = {}
    for index, jwk in enumerate(obj["keys"]):
        where = f"keys[{index}]"
        if not isinstance(jwk, Mapping):
            raise CapabilityKeyError(f"{where}: a JWK must be a JSON object")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", ALGORITHM) not in (
            ALGORITHM,
            "Ed25519",
        ):
            continue
        if "d" in jwk:
            raise CapabilityKeyError(f"{where}: contains private key material")
        try:
            raw = _b64url_decode(jwk.get("x"))
            if len(raw) != 32:
                raise ValueError("wrong length")
            public_key = Ed25519PublicKey.from_public_bytes(raw)
        except (ValueError, TypeError, binascii.Error) as e:
            raise CapabilityKeyError(f'{where}: "x" is not a valid Ed25519 public key') from e
        kid = jwk.get("kid", key_id(public_key))
        if not isinstance(kid, str) or not kid:
            raise CapabilityKeyError(f'{where}: "kid" must be a non-empty string')
        _add_key(keys, kid, public_key, where)
    if not keys:
        raise CapabilityKeyError("the JWKS holds no Ed25519 signature key")
    return keys


def _add_key(
    keys: dict[str, Ed25519PublicKey], kid: str, public_key: Ed25519PublicKey, where: str
) -> None:
    previous = keys.get(kid)
    if previous is not None and _raw_public_bytes(previous) != _raw_public_bytes(public_key):
        raise CapabilityKeyError(f"{where}: two different keys share kid {kid!r}")
    keys[kid] = public_key


def _parse_pem_keys(data: bytes) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise CapabilityKeyError("no PEM block found")
    for index, match in enumerate(blocks):
        label = match.group(1).decode("ascii")
        where = f"PEM block {index + 1} ({label})"
        block = match.group(0)
        public_key: Any
        try:
            if label.endswith("PRIVATE KEY"):
                private_key = serialization.load_pem_private_key(block, password=None)
                public_key = private_key.public_key()
            elif label.endswith("PUBLIC KEY"):
                public_key = serialization.load_pem_public_key(block)
            else:
                continue
        except TypeError as e:
            raise CapabilityKeyError(f"{where}: the private key is encrypted") from e
        except (ValueError, UnsupportedAlgorithm) as e:
            raise CapabilityKeyError(f"{where}: not a valid key") from e
        if not isinstance(public_key, Ed25519PublicKey):
            raise CapabilityKeyError(f"{where}: {type(public_key).__name__} is not Ed25519")
        _add_key(keys, key_id(public_key), public_key, where)
    if not keys:
        raise CapabilityKeyError("no PEM public or private key found")
    return keys


def _parse_key_text(data: bytes) -> dict[str, Ed25519PublicKey]:
    if data.lstrip().startswith(b"{"):
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise CapabilityKeyError(f"not valid JSON: {e}") from e
        return parse_jwks(obj)
    if b"-----BEGIN " in data:
        return _parse_pem_keys(data)
    raise CapabilityKeyError("neither a PEM key nor a JWKS (JSON) document")


def load_public_keys(path_or_text: str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    """Load capability verification keys, by ``kid``.

    *path_or_text* is either the name of a file or the text itself (a string
    that contains ``-----BEGIN`` or starts with ``{``). The content is one of:

    - PEM: one or more ``PUBLIC KEY`` blocks, or ``PRIVATE KEY`` blocks from
      which the public key is derived (the switchboard's own key file);
    - a JWKS JSON document ``{"keys": [...]}``, as served at
      ``/.well-known/treadmill/capability-keys`` (see :func:`parse_jwks`).

    :raises CapabilityKeyError: naming the file, if it cannot be read or holds
        no usable Ed25519 key.
    """
    if isinstance(path_or_text, str) and (
        "-----BEGIN " in path_or_text or path_or_text.lstrip().startswith("{")
    ):
        source = "capability keys"
        data = path_or_text.encode("utf-8")
    else:
        source = os.fspath(path_or_text)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CapabilityKeyError(
                f"{source}: cannot read capability keys: {e.strerror or e}"
            ) from e
    try:
        return _parse_key_text(data)
    except CapabilityKeyError as e:
        raise CapabilityKeyError(f"{source}: {e}") from e


# -- claims -----------------------------------------------------------------


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class Access:
    """One grant: these *actions* on the object *name* of kind *type*.

    Serialised as a Docker registry token ``access`` entry:
    ``{"type": "repository", "name": "lab/fw", "actions": ["pull", "push"]}``.
    """

    type: str
    name: str
    actions: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_name("access type", self.type)
        _check_name("access name", self.name)
        if isinstance(self.actions, str):
            raise TypeError("access actions must be a sequence of strings, not a string")
        actions = tuple(self.actions)
        for action in actions:
            _check_name("access action", action)
        object.__setattr__(self, "actions", actions)

    def allows(self, type: str, name: str, action: str) -> bool:
        """Whether this grant covers *action* on (*type*, *name*). Exact match only."""
        return self.type == type and self.name == name and action in self.actions

    def to_json(self) -> dict[str, Any]:
        """Return the ``access`` entry as JSON-ready data."""
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}

    @classmethod
    def from_json(cls, obj: Any) -> Access:
        """Parse an ``access`` entry. :raises ValueError: if it is malformed."""
        if not isinstance(obj, Mapping):
            raise ValueError("an access entry must be an object")
        actions = obj.get("actions")
        if not isinstance(actions, list):
            raise ValueError("access actions must be a list")
        try:
            return cls(obj.get("type"), obj.get("name"), tuple(actions))  # type: ignore[arg-type]
        except TypeError as e:
            raise ValueError(str(e)) from e


@dataclass(frozen=True)
class Claims:
    """The verified content of a capability token.

    :ivar subject: ``sub``, who the token was issued to.
    :ivar audience: ``aud``, the services it is meant for (a tuple, even when
        the token carries a single string).
    :ivar expires_at: ``exp``, seconds since the epoch.
    :ivar access: the grants.
    :ivar raw: every claim as decoded (including any extra ones). Treat it as
        read-only.
    """

    subject: str
    audience: tuple[str, ...]
    expires_at: float
    access: tuple[Access, ...]
    raw: dict[str, Any] = field(compare=False, hash=False, repr=False)

    def allows(self, type: str, name: str, action: str) -> bool:
        """Whether any grant covers *action* on (*type*, *name*)."""
        return any(entry.allows(type, name, action) for entry in self.access)


# -- signing ----------------------------------------------------------------


class CapabilitySigner:
    """Signs capability tokens with the switchboard's key.

    :param private_key: the Ed25519 signing key.
    :param issuer: the ``iss`` claim, which verifiers compare exactly.
    :param clock: the source of ``iat``/``nbf``/``exp``.
    :param published_keys: further public keys for :meth:`jwks` to list, such
        as the previous key during a rotation, so that tokens it signed keep
        verifying until they expire.
    """

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        issuer: str,
        clock: IReactorTime,
        *,
        published_keys: Iterable[Ed25519PublicKey] = (),
    ):
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"expected an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._private_key = private_key
        self.issuer = _check_name("issuer", issuer)
        self._clock = clock
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)
        published: dict[str, Ed25519PublicKey] = {self.key_id: self.public_key}
        for public_key in published_keys:
            published.setdefault(key_id(public_key), public_key)
        self._published = tuple(published.values())

    def sign(
        self,
        subject: str,
        audience: str | list[str],
        access: Sequence[Access],
        ttl: float,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Return a signed token for *subject*, valid for *ttl* seconds from now.

        ``iat`` and ``nbf`` are now rounded down to a whole second, ``exp`` is
        now plus *ttl* rounded up (registries expect integer times). *extra*
        claims are added but may not replace a standard one.

        :raises ValueError: if *ttl* is not in (0, :data:`MAX_TTL`], or an
            argument is empty or of the wrong type.
        """
        _check_name("subject", subject)
        if isinstance(audience, str):
            aud: str | list[str] = _check_name("audience", audience)
        else:
            aud = [_check_name("audience", a) for a in audience]
            if not aud:
                raise ValueError("audience must not be empty")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
            raise ValueError(f"ttl must be a number of seconds, got {ttl!r}")
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL:g} seconds, got {ttl}")
        entries = list(access)
        for entry in entries:
            if not isinstance(entry, Access):
                raise TypeError(f"access entries must be Access, got {type(entry).__name__}")
        now = self._clock.seconds()
        claims: dict[str, Any] = {}
        if extra:
            clash = _RESERVED_CLAIMS.intersection(extra)
            if clash:
                raise ValueError(f"extra claims may not replace {', '.join(sorted(clash))}")
            claims.update(extra)
        claims.update(
            {
                "iss": self.issuer,
                "sub": subject,
                "aud": aud,
                "iat": math.floor(now),
                "nbf": math.floor(now),
                "exp": math.ceil(now + ttl),
                "jti": secrets.token_urlsafe(16),
                "access": [entry.to_json() for entry in entries],
            }
        )
        return jwt.encode(
            claims,
            self._private_key,
            algorithm=ALGORITHM,
            headers={"kid": self.key_id, "typ": "JWT"},
        )

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """Return the public JWKS to publish: the signing key first, then any others."""
        return {"keys": [public_jwk(public_key) for public_key in self._published]}


# -- verification -----------------------------------------------------------


#: The latest time claim accepted, in seconds since the epoch (the year 3000): larger
#: values are junk, and would overflow date arithmetic downstream.
MAX_TIME = 32_503_680_000


def _time(payload: Mapping[str, Any], claim: str) -> int:
    """A time claim: a whole number of seconds since the epoch, within reason."""
    value = payload.get(claim)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CapabilityError("malformed", f'"{claim}" must be a whole number of seconds')
    if not 0 <= value <= MAX_TIME:
        raise CapabilityError("malformed", f'"{claim}" is out of range')
    return value


class CapabilityVerifier:
    """Verifies capability tokens offline with the switchboard's public keys.

    :param keys: public keys by ``kid`` (see :func:`load_public_keys`).
    :param issuer: the expected ``iss``.
    :param audience: this service's name; it must be in the token's ``aud``.
    :param clock: the source of the current time.
    :param leeway: seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
    """

    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey],
        issuer: str,
        audience: str,
        clock: IReactorTime,
        leeway: float = 5.0,
    ):
        for kid, public_key in keys.items():
            if not isinstance(public_key, Ed25519PublicKey):
                raise TypeError(
                    f"key {kid!r} is {type(public_key).__name__}, not an Ed25519PublicKey"
                )
        if not 0 <= leeway <= 300:
            raise ValueError(f"leeway must be between 0 and 300 seconds, got {leeway}")
        self.keys = dict(keys)
        self.issuer = _check_name("issuer", issuer)
        self.audience = _check_name("audience", audience)
        self._clock = clock
        self.leeway = float(leeway)

    def verify(self, token: str, type: str, name: str, action: str) -> Claims:
        """Verify *token* and that it grants *action* on (*type*, *name*).

        :raises CapabilityError: for any failure; ``insufficient_scope`` if the
            token is valid but does not cover the request.
        """
        claims = self.verify_any(token)
        if not claims.allows(type, name, action):
            raise CapabilityError(
                "insufficient_scope", f"token does not grant {action} on {type} {name}"
            )
        return claims

    def verify_any(self, token: str) -> Claims:
        """Verify *token*'s signature, issuer, audience and times, but not its scope.

        :raises CapabilityError: for any failure.
        """
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise CapabilityError("malformed", "token is not ASCII") from None
        if not isinstance(token, str) or not token:
            raise CapabilityError("malformed", "no token")
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii() or token.count(".") != 2:
            raise CapabilityError("malformed", "not a compact JWS")

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise CapabilityError("malformed", "undecodable token header") from None
        # Only EdDSA, decided here and again by PyJWT's allow-list: never "none",
        # never HS* (where a public key could be misused as an HMAC secret).
        if header.get("alg") != ALGORITHM:
            raise CapabilityError("bad_signature", "token algorithm is not EdDSA")
        if "crit" in header or "b64" in header:
            raise CapabilityError("malformed", "unsupported critical header")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise CapabilityError("unknown_key", "token names no key")
        public_key = self.keys.get(kid)
        if public_key is None:
            raise CapabilityError("unknown_key", "token signed by an unknown key")

        try:
            decoded = jwt.decode_complete(
                token,
                key=public_key,
                algorithms=[ALGORITHM],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise CapabilityError("bad_signature", "signature verification failed") from None
        except jwt.InvalidAlgorithmError:
            raise CapabilityError("bad_signature", "token algorithm is not EdDSA") from None
        except jwt.PyJWTError:
            raise CapabilityError("malformed", "undecodable token") from None
        payload: dict[str, Any] = decoded["payload"]

        # Trusted from here on: the switchboard signed it. Check what it says.
        if payload.get("iss") != self.issuer:
            raise CapabilityError("wrong_issuer", "token issued by someone else")
        aud = payload.get("aud")
        audience = (aud,) if isinstance(aud, str) else aud
        if not isinstance(audience, list | tuple) or not all(isinstance(a, str) for a in audience):
            raise CapabilityError("malformed", '"aud" must be a string or a list of strings')
        if self.audience not in audience:
            raise CapabilityError("wrong_audience", "token is meant for another service")

        expires_at = _time(payload, "exp")
        not_before = _time(payload, "nbf") if "nbf" in payload else None
        issued_at = _time(payload, "iat")
        # The signer rounds iat down and exp up: a lifetime of MAX_TTL spans MAX_TTL + 1.
        longest = MAX_TTL + 1
        if expires_at <= issued_at:
            raise CapabilityError("malformed", '"exp" must be later than "iat"')
        if expires_at - issued_at > longest:
            raise CapabilityError("malformed", "token lifetime exceeds the maximum")
        if not_before is not None and not issued_at <= not_before < expires_at:
            raise CapabilityError("malformed", '"nbf" must lie between "iat" and "exp"')
        now = self._clock.seconds()
        if expires_at - now > longest + self.leeway:
            raise CapabilityError("malformed", "token lifetime exceeds the maximum")
        if now >= expires_at + self.leeway:
            raise CapabilityError("expired", "token has expired")
        if not_before is not None and now < not_before - self.leeway:
            raise CapabilityError("not_yet_valid", "token is not valid yet")
        if now < issued_at - self.leeway:
            raise CapabilityError("not_yet_valid", "token was issued in the future")

        subject = payload.get("sub")
        if not isinstance(subject, str) or not subject:
            raise CapabilityError("malformed", '"sub" must be a non-empty string')
        entries = payload.get("access", [])
        if not isinstance(entries, list):
            raise CapabilityError("malformed", '"access" must be a list')
        try:
            access = tuple(Access.from_json(entry) for entry in entries)
        except ValueError as e:
            raise CapabilityError("malformed", f"bad access entry: {e}") from None

        return Claims(
            subject=subject,
            audience=tuple(audience),
            expires_at=float(expires_at),
            access=access,
            raw=payload,
        )


def bearer_token(request_header_value: bytes | str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header value, or None.

    The scheme is case-insensitive (RFC 9110); the token must be an RFC 6750
    ``b64token``. Anything else (absent header, another scheme, junk) is None.
    """
    value = request_header_value
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    token = parts[1]
    if len(token) > MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
        return None
    return token
