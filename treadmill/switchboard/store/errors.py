"""The errors the store raises (the API answers ``404`` and ``409`` for the first two)."""

from __future__ import annotations


class NotFound(LookupError):
    """No such resource (or none the caller may see)."""


class Conflict(ValueError):
    """The request conflicts with the current state (a duplicate name, say)."""


class IdempotencyKeyReused(Conflict):
    """An Idempotency-Key sent again with a different request."""


class NotYourJob(PermissionError):
    """A supervisor reported on a job that is not on its host."""
