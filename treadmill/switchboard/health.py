"""Host health decisions: pure logic, no I/O (``docs/operations.md``, "Host health").

Whose fault a job's end is comes from :func:`jobstate.blame`; this module decides
what follows on the host: count a suspicious failure, run a health check, take
the host out of service, and what a health check's end says.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from treadmill.switchboard.jobstate import CLEARING_REASONS, Blame, Reason


class Event(StrEnum):
    """What a host's health history records (``GET /api/v1/hosts/{name}/health``)."""

    FAILURE = "failure"
    """A suspicious (host-side) failure, counted against the host."""
    NOT_COUNTED = "not_counted"
    """A start failure blamed on the job: its image never became ready anywhere."""
    CHECK_STARTED = "check_started"
    CHECK_PASSED = "check_passed"
    CHECK_FAILED = "check_failed"
    CHECK_INCONCLUSIVE = "check_inconclusive"
    """A check cancelled, ended by an image error or by Treadmill's own fault: health
    unchanged."""
    OUT_OF_SERVICE = "out_of_service"
    """Failures in a row on a host without a health check."""
    ENABLED = "enabled"
    """An operator put the host back in service (``tml host enable``)."""


@dataclass(frozen=True)
class AfterJob:
    """What follows an ordinary job's end on its host."""

    failures: int
    """The host's count of suspicious failures in a row, after this job."""
    event: Event | None = None
    """What the history records (None: nothing)."""
    check: str | None = None
    """Why a health check runs now (None: none runs)."""
    out_of_service: bool = False
    """Take the host out of service (no health check applies)."""


def after_job(blame: Blame, reason: Reason, *, failures: int, threshold: int,
              has_check: bool, jobs_since_check: int, every_jobs: int | None,
              hours_since_check: float | None = None,
              every_hours: float | None = None) -> AfterJob:
    """Decide what an ordinary job's end means for its host.

    ``failures`` is the count before this job, ``jobs_since_check`` the jobs
    ended on the host since its last check, this one excluded. A failure blamed
    on the host counts; ``threshold`` of them in a row run the host's health
    check if one applies (only the check's failure takes the host out), or take
    the host out of service if none does. Every ``every_jobs`` jobs, and at the
    first job end ``every_hours`` after the last check (``hours_since_check``),
    the check runs anyway.
    """
    event: Event | None = None
    if blame is Blame.HOST:
        failures += 1
        event = Event.FAILURE
    elif reason is Reason.HOST_START_FAILURE:
        event = Event.NOT_COUNTED
    elif blame is Blame.JOB and reason in CLEARING_REASONS:
        failures = 0
    if blame is Blame.HOST and failures >= threshold:
        if has_check:
            return AfterJob(failures, event, check=f"{failures} host-side failures in a row")
        return AfterJob(failures, event, out_of_service=True)
    if has_check and every_jobs is not None and jobs_since_check + 1 >= every_jobs:
        return AfterJob(failures, event, check=f"every {every_jobs} jobs")
    if (has_check and every_hours is not None and hours_since_check is not None
            and hours_since_check >= every_hours):
        return AfterJob(failures, event, check=f"every {every_hours:g} hours")
    return AfterJob(failures, event)


def check_passed(reason: Reason, exit_status: int | None, expect_exit: int, *,
                 instance_died: bool = False) -> bool | None:
    """Whether a health-check job's end passes the check: its workload exited with
    ``expect_exit``. None when it says nothing about the host: cancelled, an
    internal error, its link's switchboard instance died, or its image could not be
    fetched or used (``image_error``: the operator's image or an image store, whose
    outage must not take every host it reaches out of service)."""
    if reason in (Reason.USER_TERMINATED, Reason.INTERNAL_ERROR, Reason.IMAGE_ERROR):
        return None
    if reason is Reason.HOST_UNREACHABLE and instance_died:
        return None
    return reason is Reason.WORKLOAD_EXITED and exit_status == expect_exit


def check_event(passed: bool | None) -> Event:
    """The history event of a check's end."""
    if passed is None:
        return Event.CHECK_INCONCLUSIVE
    return Event.CHECK_PASSED if passed else Event.CHECK_FAILED
