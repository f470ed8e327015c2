"""Deferred helpers shared by the roles."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def fork(d: Deferred[Any]) -> Deferred[Any]:
    """A new Deferred that fires as ``d`` does, leaving ``d``'s own result in place for its
    other consumers (many may wait on one shared Deferred this way)."""
    copy: Deferred[Any] = Deferred()

    def relay(result: Any) -> Any:
        if isinstance(result, Failure):
            copy.errback(result)
        else:
            copy.callback(result)
        return result

    d.addBoth(relay)
    return copy
