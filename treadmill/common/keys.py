"""The switchboard's public keys, for satellites that verify capability tokens.

Satellite servers (image stores, log servers, proxies) never ask the
switchboard whether a request may proceed: they verify the capability token
it carries against the switchboard's Ed25519 public keys. :class:`KeySource`
keeps those keys: from a file (``auth.keys_file``: PEM or JWKS), or fetched
from the switchboard's ``/.well-known/treadmill/capability-keys`` (``auth.keys_url``)
at start and every ``refresh`` seconds, with the last good set cached on disk
so that a satellite restarts and keeps working while the switchboard is down.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from treadmill.common.captoken import (
    CapabilityError,
    CapabilityKeyError,
    CapabilityVerifier,
    Claims,
    bearer_token,
    load_public_keys,
    parse_jwks,
)
from treadmill.common.config import (
    FLOAT,
    STR,
    ConfigError,
    Row,
    Setting,
    positive,
    table,
)
from treadmill.common.files import write_atomically
from treadmill.common.http import ApiError
from treadmill.common.timers import every


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_url(value: Any) -> str:
    """Check ``auth.keys_url``: ``https``, or plain ``http`` to a loopback host only
    (a key set fetched in the clear from elsewhere could be replaced on the way)."""
    url = STR(value)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ValueError(f"invalid URL {url!r}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"expected an https:// URL, got {url!r}")
    if parts.scheme == "http" and not _loopback(host):
        raise ValueError(f"{url!r} must use https (plain http only to a loopback host): "
                         "the key set decides which tokens are trusted")
    return url


def satellite_settings(what: str, keys_field: str) -> tuple[Setting, ...]:
    """The settings of every satellite role: ``service``, its name (the audience of the
    capability tokens it accepts, filling the config field ``service``), and the key
    source's, in the table ``auth``, filling the fields ``keys_field`` names (:func:`table`)."""
    return (
        *table("", "{leaf}", service=Row(
            STR, f"This {what}'s name: the audience (aud) its capability tokens must name.")),
        *table("auth", keys_field,
               keys_url=Row(keys_url,
                            "The switchboard's capability key set, e.g. "
                            "https://switchboard.example/.well-known/treadmill/capability-keys.",
                            default=None),
               keys_file=Row(STR, "A PEM or JWKS file of capability keys (instead of, or "
                                  "cached from, keys_url).", default=None),
               keys_refresh=Row(positive(FLOAT), "Seconds between fetches of auth.keys_url.",
                                default=300.0),
               issuer=Row(STR, "Issuer (iss) capability tokens must carry.",
                          default="treadmill"),
               ca_file=Row(STR, "CA certificates for an https keys_url.", default=None)),
    )


def require_keys(values: Mapping[str, Any], source: str,
                 hint: str = "the switchboard's capability keys") -> None:
    """For a role's ``checkSettings``: refuse settings that name no capability keys, or an
    empty ``service`` (the audience its tokens must name)."""
    if not values["auth.keys_url"] and not values["auth.keys_file"]:
        raise ConfigError(f"set auth.keys_file or auth.keys_url ({hint})", key="auth.keys_file",
                          source=source)
    if not values["service"]:
        raise ConfigError("must not be empty", key="service", source=source)


class KeySource(MultiService):
    """The current set of capability keys, kept fresh."""

    log = Logger()

    def __init__(self, reactor: Any, *, url: str | None = None, file: str | None = None,
                 refresh: float = 300.0, ca_file: str | None = None):
        super().__init__()
        if url is None and file is None:
            raise CapabilityKeyError("set auth.keys_url or auth.keys_file")
        if url is not None:
            try:
                keys_url(url)
            except ValueError as e:
                raise CapabilityKeyError(f"auth.keys_url: {e}") from None
        self.reactor = reactor
        self.url = url
        self.file = file
        self.ca_file = ca_file
        self.keys: dict[str, Ed25519PublicKey] = {}
        self._ready: Deferred[None] | None = None
        if file is not None and (url is None or os.path.exists(file)):
            self.keys = load_public_keys(file)
        if url is not None:
            every(refresh, self.fetch, reactor, parent=self)

    def ready(self) -> Deferred[None]:
        """Fires once keys are known (at once when a file supplied them)."""
        if self.keys:
            return succeed(None)
        if self._ready is None:
            self._ready = Deferred()
        return self._ready

    def _http(self) -> Any:
        if self.url is not None and self.url.startswith("https:") and self.ca_file:
            from twisted.web.client import Agent

            from treadmill.common.tls import client_policy

            return treq.client.HTTPClient(Agent(self.reactor,
                                                contextFactory=client_policy(self.ca_file)))
        return treq

    async def fetch(self) -> None:
        """Fetch the key set from ``url``; keep the old one on failure."""
        assert self.url is not None
        try:
            response = await self._http().get(self.url, timeout=10)
            body = await response.content()
            if response.code != 200:
                raise CapabilityKeyError(f"HTTP {response.code}")
            keys = parse_jwks(json.loads(body))
        except Exception as e:
            self.log.warn("Could not fetch capability keys from {url}: {error}", url=self.url,
                          error=str(e) or type(e).__name__)
            return
        if keys != self.keys:
            self._log_change(self.keys, keys)
            self.keys = keys  # a new object: verifiers drop what they cached
        if self.file is not None:
            write_atomically(self.file, body, mode=0o640)
        if self._ready is not None and not self._ready.called:
            self._ready.callback(None)

    def _log_change(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """Say which key ids a fetch added and removed (a removal at warn level: tokens
        signed with that key stop verifying here)."""
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(kid for kid in set(old) & set(new) if old[kid] != new[kid])
        if not old:
            self.log.info("Capability keys from {url}: {kids}", url=self.url,
                          kids=", ".join(added))
            return
        if added:
            self.log.info("Capability keys added from {url}: {kids}", url=self.url,
                          kids=", ".join(added))
        if removed or changed:
            self.log.warn("Capability keys removed from {url}: {kids}", url=self.url,
                          kids=", ".join(removed + [f"{kid} (replaced)" for kid in changed]))

    def verifier(self, issuer: str, audience: str) -> LiveVerifier:
        return LiveVerifier(self, issuer, audience)


def bearer_claims(request: IRequest, verifier: Any,
                  refused: Callable[[], None] | None = None) -> tuple[str, Claims]:
    """The bearer capability token of ``request`` and its claims (``verifier.verify_any``);
    a 401 :class:`ApiError` if it has none, or if ``verifier`` refuses it (after calling
    ``refused``)."""
    token = bearer_token(request.getHeader("authorization"))
    if token is None:
        raise ApiError(401, "a capability token is required (Authorization: Bearer)")
    try:
        claims: Claims = verifier.verify_any(token)
    except CapabilityError as e:
        if refused is not None:
            refused()
        raise ApiError(401, f"capability token refused ({e.reason}): {e.message}") from None
    return token, claims


class LiveVerifier:
    """A :class:`CapabilityVerifier` that always uses the source's current keys.

    A token is used many times (a supervisor appends to its log streams, a
    client pulls blob after blob), and a signature check costs far more than
    the request: the claims of the last ``cache_size`` tokens that verified
    are kept until the token expires or the key set changes. Failures are
    not cached.
    """

    def __init__(self, source: KeySource, issuer: str, audience: str,
                 cache_size: int = 4096):
        self.source = source
        self.issuer = issuer
        self.audience = audience
        self.cache_size = cache_size
        self._verifier: CapabilityVerifier | None = None
        self._keys: Any = None  # the source's key set the verifier was made from
        self._cache: OrderedDict[str, Claims] = OrderedDict()

    def _current(self) -> CapabilityVerifier:
        verifier = self._verifier
        if verifier is None or self._keys is not self.source.keys:
            self._keys = self.source.keys
            verifier = self._verifier = CapabilityVerifier(
                self._keys, self.issuer, self.audience, self.source.reactor)
            self._cache.clear()
        return verifier

    def verify(self, token: str, type: str, name: str, action: str) -> Claims:
        claims = self.verify_any(token)
        if not claims.allows(type, name, action):
            raise CapabilityError("insufficient_scope",
                                  f"token does not grant {action} on {type} {name}")
        return claims

    def verify_any(self, token: str) -> Claims:
        verifier = self._current()
        claims = self._cache.get(token) if isinstance(token, str) else None
        if claims is not None:
            if self.source.reactor.seconds() < claims.expires_at + verifier.leeway:
                self._cache.move_to_end(token)
                return claims
            del self._cache[token]
        claims = verifier.verify_any(token)
        if isinstance(token, str):
            self._cache[token] = claims
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return claims


def key_source(reactor: Any, values: Mapping[str, Any]) -> KeySource:
    """A :class:`KeySource` from a role's ``auth.*`` settings."""
    return KeySource(reactor, url=values.get("auth.keys_url"),
                     file=values.get("auth.keys_file"),
                     refresh=values.get("auth.keys_refresh", 300.0),
                     ca_file=values.get("auth.ca_file"))


def attach_keys(root: MultiService, reactor: Any, auth: Mapping[str, Any], audience: str,
                source: KeySource | None = None) -> tuple[KeySource, LiveVerifier]:
    """A satellite's ``keys`` child of ``root`` (``source``, or one made from the
    ``auth.*`` settings) and the verifier of the tokens addressed to ``audience``."""
    keys = source if source is not None else key_source(reactor, auth)
    keys.setName("keys")
    keys.setServiceParent(root)
    return keys, keys.verifier(auth.get("auth.issuer") or "treadmill", audience)


