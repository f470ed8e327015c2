"""Authentication of API requests by bearer token, and the guard of passwords.

A token is accepted only on a database read that began after the request
arrived, so a revocation (a disabled user, a changed admin flag) committed
through any switchboard instance holds on every instance from the next request
on; no notification can come too late. Concurrent requests with one token
share reads: while a read runs, later requests wait for the next one, so a
busy client costs at most two reads at a time. Refusals are cached for ``ttl``
seconds (a refused token stays refused unless a user is re-enabled, which the
``treadmill_auth`` notification announces and which clears that cache). Token
use is recorded in batches.

:class:`PasswordGuard` stands before every password check (``POST
/api/v1/login``, HTTP Basic on the registry token endpoint): attempts are
rate-limited per client address and per user name, refused with ``429`` before
any database or hashing work, and the memory-hard hashing itself runs at most
a few at a time.

The web console (``docs/console.md``) sends the same token in an HttpOnly
cookie instead of the ``Authorization`` header; a state-changing request
authenticated by that cookie must also carry :data:`CSRF_HEADER` with the
value :func:`csrf_token` derives from the session token (a cross-site page can
neither read it nor set the header). Requests with a bearer token are not
affected.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from treadmill.common.captoken import bearer_token
from treadmill.common.http import ApiError
from treadmill.common.ratelimit import (
    ConcurrencyGate,
    RateLimited,
    RateLimiter,
    Saturated,
    admit,
)
from treadmill.common.settingsfile import config_class
from treadmill.common.timers import every
from treadmill.switchboard import credentials
from treadmill.switchboard.access import Principal
from treadmill.switchboard.database import unavailable
from treadmill.switchboard.settings import SETTINGS
from treadmill.switchboard.store import Store

SESSION_COOKIE = "treadmill_session"
"""The web console's cookie holding the session's API token (HttpOnly)."""
CSRF_COOKIE = "treadmill_csrf"
"""The cookie the console's script reads the CSRF token from (not HttpOnly)."""
CSRF_HEADER = "X-CSRF-Token"
"""The header a cookie-authenticated state-changing request carries."""
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def csrf_token(session: str) -> str:
    """The CSRF token bound to a session token: a digest only its holder can compute."""
    return hashlib.sha256(b"treadmill-csrf\0" + session.encode("utf-8")).hexdigest()


def session_token(request: IRequest) -> str | None:
    """The console session's token from its cookie (None: no cookie).

    A state-changing request must carry :data:`CSRF_HEADER` matching the session,
    else ``403``."""
    raw = request.getCookie(SESSION_COOKIE.encode())
    if not raw:
        return None
    token = raw.decode("ascii", "replace")
    if request.method not in SAFE_METHODS:
        sent = (request.getHeader(CSRF_HEADER) or "").encode("ascii", "replace")
        if not hmac.compare_digest(sent, csrf_token(token).encode()):
            raise ApiError(403, f"CSRF check failed: a request authenticated by the console's "
                                f"cookie must send {CSRF_HEADER}")
    return token


class Authenticator:
    """Turns a request's bearer token into a :class:`Principal`."""

    log = Logger()

    def __init__(self, store: Store, clock: Any, ttl: float = 5.0, size: int = 10000):
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._refused: OrderedDict[bytes, float] = OrderedDict()
        self._reading: set[bytes] = set()
        self._waiting: dict[bytes, list[Deferred[Principal | None]]] = {}
        self._generation = 0
        self.reads = 0
        """Token reads from the database since start."""
        self._used: dict[str, datetime] = {}

    def invalidate(self, _payload: object = None) -> None:
        """Forget cached refusals (called on ``treadmill_auth`` notifications)."""
        self._refused.clear()
        self._generation += 1

    def _lookup(self, digest: bytes) -> Deferred[Principal | None]:
        """The token's principal, from a database read that begins after this call."""
        d: Deferred[Principal | None] = Deferred()
        self._waiting.setdefault(digest, []).append(d)
        if digest not in self._reading:
            self._read(digest)
        return d

    def _read(self, digest: bytes) -> None:
        waiters = self._waiting.pop(digest)
        self._reading.add(digest)
        self.reads += 1
        generation = self._generation
        read = Deferred.fromCoroutine(self.store.authenticate(digest))

        def done(result: Principal | Failure | None) -> None:
            self._reading.discard(digest)
            if digest in self._waiting:
                self._read(digest)  # Those who came meanwhile get a fresh read.
            if result is None and generation == self._generation:
                self._refused[digest] = self.clock.seconds() + self.ttl
                self._refused.move_to_end(digest)
                while len(self._refused) > self.size:
                    self._refused.popitem(last=False)
            for waiter in waiters:
                if not waiter.called:  # A cancelled request stopped waiting.
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback(result)

        read.addBoth(done)

    async def principal(self, request: IRequest) -> Principal:
        """The authenticated user (bearer token, else the console's cookie), or a ``401``
        :class:`ApiError`."""
        token = bearer_token(request.getHeader("authorization"))
        if token is None:
            token = session_token(request)
        if token is None:
            raise ApiError(401, "authentication required: send Authorization: Bearer <token>")
        return await self.for_token(token)

    async def for_token(self, token: str) -> Principal:
        """The user an API token belongs to, or a ``401`` :class:`ApiError`."""
        if not credentials.looks_like_token(token, credentials.USER_TOKEN_PREFIX):
            raise ApiError(401, "invalid API token")
        digest = credentials.token_hash(token)
        now = self.clock.seconds()
        refused = self._refused.get(digest)
        principal = None if refused is not None and refused > now else await self._lookup(
            digest)
        if principal is None:
            raise ApiError(401, "invalid, expired or revoked API token")
        if principal.token_id is not None:
            self._used[principal.token_id] = datetime.fromtimestamp(now, UTC)
        return principal

    async def flush_usage(self) -> None:
        """Write the batched last-use times; while the database is unavailable they are
        kept (a warning, not a traceback) and written by a later flush."""
        used, self._used = self._used, {}
        try:
            await self.store.touch_tokens(used)
        except Exception as e:
            if not unavailable(e):
                self.log.failure("Could not record token use")
                return
            self.log.warn("Could not record token use: the database is unavailable")
            for token_id, at in used.items():  # a use recorded meanwhile is newer
                self._used.setdefault(token_id, at)

    def usage_service(self, interval: float = 10.0) -> TimerService:
        return every(interval, self.flush_usage, self.clock)


@config_class(SETTINGS, "passwords", frozen=True)
class PasswordPolicy:
    """Limits of password attempts: the ``login.*`` settings (fields, types and defaults:
    ``settings.toml``)."""


def client_address(request: IRequest, trusted_proxies: frozenset[str] = frozenset()
                   ) -> str | None:
    """The client's address as given (None: not an IP connection).

    Behind a trusted proxy, the address it appended to ``X-Forwarded-For``."""
    host = getattr(request.getClientAddress(), "host", None)
    if host is None:
        return None
    if host in trusted_proxies:
        forwarded = (request.getHeader("x-forwarded-for") or "").split(",")[-1].strip()
        host = forwarded or host
    return str(host)


def client_key(request: IRequest, trusted_proxies: frozenset[str] = frozenset()) -> str:
    """Who the rate limit counts a request against: its IPv4 address or IPv6 /64.

    Behind a trusted proxy, the address it appended to ``X-Forwarded-For``."""
    host = client_address(request, trusted_proxies)
    if host is None:
        return "local"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class PasswordGuard:
    """Rate limits per client address and per user, and a bound on concurrent hashing.

    A request spends a token of its address and of the user it names before
    any work; a correct password gives both back, so a legitimate client is
    limited only by its failures (and the burst of its concurrent attempts)."""

    log = Logger()

    def __init__(self, reactor: Any, policy: PasswordPolicy | None = None):
        policy = policy or PasswordPolicy()
        self.reactor = reactor
        self.policy = policy
        self.by_address = RateLimiter(reactor, policy.address_rate, policy.address_burst,
                                      policy.table_size)
        self.by_user = RateLimiter(reactor, policy.user_rate, policy.user_burst,
                                   policy.table_size)
        self.hashing = ConcurrencyGate(policy.max_hashing, policy.hashing_queue)
        self._trusted = frozenset(policy.trusted_proxies)
        self.trusted_proxies = self._trusted
        self._refused = 0
        self._warned_at = float("-inf")

    def admit(self, request: IRequest, user: str) -> list[tuple[RateLimiter, str]]:
        """Spend the attempt, or raise ``429`` with ``Retry-After``; the keys spent."""
        address = client_key(request, self._trusted)
        keys = [(self.by_address, address), (self.by_user, user.lower()[:128])]
        try:
            admit(keys)
        except RateLimited as e:
            self._refused += 1
            now = self.reactor.seconds()
            if now - self._warned_at >= 10.0:  # A flood must not flood the log too.
                self.log.warn("{count} password attempts refused over the limit, the last "
                              "from {address} for {user!r}", count=self._refused,
                              address=address, user=user[:64])
                self._warned_at, self._refused = now, 0
            raise ApiError(429, "too many password attempts; retry later",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return keys

    def succeeded(self, keys: list[tuple[RateLimiter, str]]) -> None:
        """The password was right: the attempt does not count."""
        for limiter, key in keys:
            limiter.give(key)

    async def verify(self, password: str, encoded: str | None) -> bool:
        """:func:`credentials.verify_password`, a few at a time (``503`` when saturated)."""
        return await self._gated(credentials.verify_password, self.reactor, password, encoded)

    async def hash(self, password: str) -> str:
        """:func:`credentials.hash_password`, a few at a time (``503`` when saturated)."""
        return await self._gated(credentials.hash_password, self.reactor, password)

    async def _gated(self, call: Any, *args: Any) -> Any:
        try:
            return await self.hashing.run(call, *args)
        except Saturated:
            raise ApiError(503, "too many password checks under way; retry shortly",
                           headers={"Retry-After": "1"}) from None
