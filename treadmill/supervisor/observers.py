"""What the runner tells about its jobs: :class:`IJobObserver`, implemented by
``JobLogs`` (log shipping) and ``JobExposure`` (proxy publishing).

The runner calls every observer it was given (``JobRunner.add_observer``), in
order, for every job; an observer that raises is logged and the others are still
called. Calls come from the reactor thread and must not block. ``SupervisorMetrics``
observes too; :class:`JobObserver` is a base that ignores what it does not override.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Interface, implementer

__all__ = ["IJobObserver", "JobObserver"]


class IJobObserver(Interface):
    """Follows the jobs of one supervisor's runner."""

    def job_started(job: dict[str, Any]) -> None:
        """A job was accepted, or re-adopted after a restart: its ``JobStart``
        (fresh tokens for its log servers and proxies included)."""

    def tokens_renewed(job: dict[str, Any]) -> None:
        """The current job, or the held ended job, was extended (``renew_tokens``): its
        ``JobStart`` now, with its new ``timeout`` and fresh tokens for its log servers and
        proxies, to use from the next request or connection on."""

    def console(job_id: str, data: bytes) -> None:
        """Output of the current job's console, or of a held ended job's host."""

    def results(job_id: str, line: bytes) -> None:
        """A line of the job's ``results`` stream (docs/results.md)."""

    def services(job_id: str, services: dict[str, tuple[str, int]]) -> None:
        """The job's host offers ``services`` now (the whole set, ``IJobReporter.services``)."""

    def event(event: dict[str, Any]) -> None:
        """A job event (without ``request_id``) was queued for the switchboard;
        ``terminated`` is the job's last (with ``held``, its host is kept until
        :meth:`hold_ended`)."""

    def hold_changed(change: dict[str, Any]) -> None:
        """The hold of an ended job's host started, resumed after a restart, was extended,
        or ended (before :meth:`hold_ended`): ``change`` is the job's ``events`` stream line for it
        (``hold.hold_change``)."""

    def hold_ended(job_id: str) -> None:
        """The hold of ended job ``job_id``'s host is over; the host was torn down."""


@implementer(IJobObserver)
class JobObserver:
    """An :class:`IJobObserver` that ignores everything: subclasses override what they follow."""

    def job_started(self, job: dict[str, Any]) -> None:
        pass

    def tokens_renewed(self, job: dict[str, Any]) -> None:
        pass

    def console(self, job_id: str, data: bytes) -> None:
        pass

    def results(self, job_id: str, line: bytes) -> None:
        pass

    def services(self, job_id: str, services: dict[str, tuple[str, int]]) -> None:
        pass

    def event(self, event: dict[str, Any]) -> None:
        pass

    def hold_changed(self, change: dict[str, Any]) -> None:
        pass

    def hold_ended(self, job_id: str) -> None:
        pass
