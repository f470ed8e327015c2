"""Authentication of API requests by bearer token.

A token is accepted only on a database read that began after the request
arrived, so a revocation (a disabled user, a changed admin flag) committed
through any switchboard instance holds on every instance from the next request
on; no notification can come too late. Concurrent requests with one token
share reads: while a read runs, later requests wait for the next one, so a
busy client costs at most two reads at a time. Refusals are cached for ``ttl``
seconds (a refused token stays refused unless a user is re-enabled, which the
``treadmill_auth`` notification announces and which clears that cache). Token
use is recorded in batches.
"""

from __future__ import annotations

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
from treadmill.switchboard import credentials
from treadmill.switchboard.access import Principal
from treadmill.switchboard.store import Store


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
        """The authenticated user, or a ``401`` :class:`ApiError`."""
        token = bearer_token(request.getHeader("authorization"))
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
        """Write the batched last-use times."""
        used, self._used = self._used, {}
        try:
            await self.store.touch_tokens(used)
        except Exception:
            self.log.failure("Could not record token use")

    def usage_service(self, interval: float = 10.0) -> TimerService:
        from twisted.internet.defer import Deferred

        service = TimerService(interval, lambda: Deferred.fromCoroutine(self.flush_usage()))
        service.clock = self.clock
        return service
