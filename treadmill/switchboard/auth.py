"""Authentication of API requests by bearer token.

Looking a token up costs a database round trip, so an answer is cached for a
few seconds. Any change to tokens or users (revocation, a disabled user, a
changed admin flag) is announced on the ``treadmill_auth`` channel and clears
the cache of every switchboard instance; the TTL bounds staleness if that
notification is lost. Token use is recorded in batches.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from twisted.application.internet import TimerService
from twisted.logger import Logger
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
        self._cache: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()
        self._used: dict[str, datetime] = {}

    def invalidate(self, _payload: object = None) -> None:
        """Forget every cached answer (called on ``treadmill_auth`` notifications)."""
        self._cache.clear()

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
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal = await self.store.authenticate(digest)
            self._cache[digest] = (now + self.ttl, principal)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
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
