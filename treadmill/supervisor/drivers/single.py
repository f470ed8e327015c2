"""``SingleJobDriver``: the bookkeeping of a host driver that runs one job at a time.

The mock and qemu drivers keep their job's run in ``self.run`` (an object with
``job_id`` and ``stop(reason)``); this base class answers ``current``, ``stop``
and the "already running" part of ``start`` for them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from treadmill.supervisor.drivers import StartRefused

__all__ = ["SingleJobDriver"]


class SingleJobDriver:
    """A driver whose one job's run, if any, is ``self.run``."""

    run: Any = None

    @property
    def current(self) -> str | None:
        """The id of the job the host runs, if any."""
        return self.run.job_id if self.run is not None else None

    def busy(self, job: dict[str, Any], host: str) -> Deferred[None] | None:
        """What ``start(job)`` answers while a run exists: accepted again for the same
        job, refused for another (``host`` names the host in the message); ``None``
        when the host is free."""
        if self.run is None:
            return None
        if self.run.job_id == job["id"]:
            return succeed(None)
        return fail(StartRefused("internal_error", f"{host} still runs job {self.run.job_id}"))

    def stop(self, job_id: str, reason: str) -> Deferred[None]:
        if self.run is not None and self.run.job_id == job_id:
            self.run.stop(reason)
        return succeed(None)
