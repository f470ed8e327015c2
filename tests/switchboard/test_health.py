"""Host health decisions (``jobstate.blame``, ``health.after_job``,
``health.check_passed``): one test per row of each table."""

from __future__ import annotations

import itertools

import pytest

from treadmill.switchboard import health
from treadmill.switchboard.health import AfterJob, Event
from treadmill.switchboard.jobstate import Blame, Reason, blame

R = Reason

FLAGS = ("image_ran", "instance_died", "before_image", "bad_request")


def _blame(reason: Reason, expected: Blame, *flags: str) -> object:
    """A row of :data:`BLAME`: ``reason`` with the circumstances ``flags`` (the others
    false) is ``expected``'s fault."""
    assert set(flags) <= set(FLAGS), flags
    return pytest.param(reason, {flag: flag in flags for flag in FLAGS}, expected,
                        id="-".join((reason.value, *flags)))


BLAME = [
    # A user's bad image (never ready anywhere, failed once fetched): never the host's.
    _blame(R.HOST_START_FAILURE, Blame.JOB),
    _blame(R.HOST_START_FAILURE, Blame.HOST, "image_ran"),   # it starts elsewhere
    _blame(R.HOST_START_FAILURE, Blame.HOST, "image_ran", "instance_died"),
    # Before the image was fetched (a refused start, or in starting): the host's...
    _blame(R.HOST_START_FAILURE, Blame.HOST, "before_image"),
    # ...unless it refused the job's parameters.
    _blame(R.HOST_START_FAILURE, Blame.JOB, "before_image", "bad_request"),
    _blame(R.HOST_START_FAILURE, Blame.JOB, "image_ran", "before_image", "bad_request"),
    _blame(R.HOST_DROPPED_JOB, Blame.HOST),
    _blame(R.HOST_DROPPED_JOB, Blame.HOST, "instance_died"),
    _blame(R.HOST_UNREACHABLE, Blame.HOST),
    _blame(R.HOST_UNREACHABLE, Blame.NONE, "instance_died"),  # its instance died
    _blame(R.INTERNAL_ERROR, Blame.NONE),
    _blame(R.WORKLOAD_EXITED, Blame.JOB),
    _blame(R.WORKLOAD_EXITED, Blame.JOB, *FLAGS),
    _blame(R.USER_TERMINATED, Blame.JOB),
    _blame(R.QUEUE_TIMEOUT, Blame.JOB),
    _blame(R.EXECUTION_TIMEOUT, Blame.JOB),
    _blame(R.IMAGE_ERROR, Blame.JOB),
    _blame(R.IMAGE_ERROR, Blame.JOB, "image_ran", "before_image"),
]


@pytest.mark.parametrize("reason,circumstances,expected", BLAME)
def test_blame(reason: Reason, circumstances: dict[str, bool], expected: Blame) -> None:
    assert blame(reason, **circumstances) is expected


def test_every_reason_has_a_blame_row():
    assert {row.values[0] for row in BLAME} == set(Reason)


def test_no_job_side_reason_is_ever_the_hosts():
    """Whatever the circumstances, only the three host-side reasons can count."""
    for reason in set(Reason) - {R.HOST_START_FAILURE, R.HOST_DROPPED_JOB,
                                 R.HOST_UNREACHABLE}:
        for ran, died, before, bad in itertools.product((False, True), repeat=4):
            assert blame(reason, image_ran=ran, instance_died=died, before_image=before,
                         bad_request=bad) is not Blame.HOST


# (blame, reason, failures before, has_check, jobs_since_check, every_jobs,
#  hours_since_check, every_hours) -> AfterJob; threshold 3.
AFTER = [
    # A failure blamed on the job: never counted, and it does not clear the count.
    (Blame.JOB, R.HOST_START_FAILURE, 2, True, 0, None, None, None,
     AfterJob(2, Event.NOT_COUNTED)),
    (Blame.JOB, R.HOST_START_FAILURE, 2, False, 0, None, None, None,
     AfterJob(2, Event.NOT_COUNTED)),
    (Blame.JOB, R.IMAGE_ERROR, 2, False, 0, None, None, None, AfterJob(2)),
    # A job that ran clears the count.
    (Blame.JOB, R.WORKLOAD_EXITED, 2, False, 0, None, None, None, AfterJob(0)),
    (Blame.JOB, R.USER_TERMINATED, 1, False, 0, None, None, None, AfterJob(0)),
    (Blame.JOB, R.EXECUTION_TIMEOUT, 1, False, 0, None, None, None, AfterJob(0)),
    (Blame.JOB, R.QUEUE_TIMEOUT, 1, False, 0, None, None, None, AfterJob(1)),
    # Treadmill's own fault: neither counts nor clears.
    (Blame.NONE, R.INTERNAL_ERROR, 2, True, 0, None, None, None, AfterJob(2)),
    (Blame.NONE, R.HOST_UNREACHABLE, 2, True, 0, None, None, None, AfterJob(2)),
    # The host's: counted; the threshold runs the check, or without one takes it out.
    (Blame.HOST, R.HOST_DROPPED_JOB, 0, True, 0, None, None, None,
     AfterJob(1, Event.FAILURE)),
    (Blame.HOST, R.HOST_DROPPED_JOB, 2, True, 0, None, None, None,
     AfterJob(3, Event.FAILURE, check="3 host-side failures in a row")),
    (Blame.HOST, R.HOST_UNREACHABLE, 5, True, 0, None, None, None,
     AfterJob(6, Event.FAILURE, check="6 host-side failures in a row")),
    (Blame.HOST, R.HOST_START_FAILURE, 2, False, 0, None, None, None,
     AfterJob(3, Event.FAILURE, out_of_service=True)),
    # Every N jobs (this one included) and every H hours, if a check applies.
    (Blame.JOB, R.WORKLOAD_EXITED, 0, True, 4, 5, None, None,
     AfterJob(0, check="every 5 jobs")),
    (Blame.JOB, R.WORKLOAD_EXITED, 0, True, 3, 5, None, None, AfterJob(0)),
    (Blame.JOB, R.WORKLOAD_EXITED, 0, False, 9, 5, None, None, AfterJob(0)),
    (Blame.JOB, R.HOST_START_FAILURE, 0, True, 0, 1, None, None,
     AfterJob(0, Event.NOT_COUNTED, check="every 1 jobs")),
    (Blame.JOB, R.WORKLOAD_EXITED, 0, True, 0, None, 25.0, 24.0,
     AfterJob(0, check="every 24 hours")),
    (Blame.JOB, R.WORKLOAD_EXITED, 0, True, 0, None, 23.0, 24.0, AfterJob(0)),
    (Blame.JOB, R.WORKLOAD_EXITED, 0, False, 0, None, 25.0, 24.0, AfterJob(0)),
]


@pytest.mark.parametrize(
    "blamed,reason,failures,has_check,since,every_jobs,hours,every_hours,expected", AFTER)
def test_after_job(blamed, reason, failures, has_check, since, every_jobs, hours, every_hours,
                   expected):
    assert health.after_job(blamed, reason, failures=failures, threshold=3,
                            has_check=has_check, jobs_since_check=since, every_jobs=every_jobs,
                            hours_since_check=hours, every_hours=every_hours) == expected


def test_job_blamed_failures_never_take_a_host_out():
    """However many a user causes, failures blamed on jobs never count."""
    failures = 0
    for _ in range(100):
        decision = health.after_job(Blame.JOB, R.HOST_START_FAILURE, failures=failures,
                                    threshold=3, has_check=False, jobs_since_check=0,
                                    every_jobs=None)
        assert not decision.out_of_service and decision.check is None
        failures = decision.failures
    assert failures == 0


# (reason, exit status, expected exit, instance died) -> passed
CHECKS = [
    (R.WORKLOAD_EXITED, 0, 0, False, True),
    (R.WORKLOAD_EXITED, 3, 3, False, True),
    (R.WORKLOAD_EXITED, 1, 0, False, False),
    (R.WORKLOAD_EXITED, None, 0, False, False),
    (R.EXECUTION_TIMEOUT, None, 0, False, False),
    (R.HOST_START_FAILURE, None, 0, False, False),
    (R.HOST_DROPPED_JOB, None, 0, False, False),
    (R.IMAGE_ERROR, None, 0, False, None),  # a store's outage must not take hosts out
    (R.HOST_UNREACHABLE, None, 0, False, False),
    (R.HOST_UNREACHABLE, None, 0, True, None),
    (R.USER_TERMINATED, None, 0, False, None),
    (R.INTERNAL_ERROR, None, 0, False, None),
]


@pytest.mark.parametrize("reason,exit_status,expect,died,passed", CHECKS)
def test_check_passed(reason, exit_status, expect, died, passed):
    assert health.check_passed(reason, exit_status, expect, instance_died=died) is passed
    assert health.check_event(passed) is {True: Event.CHECK_PASSED, False: Event.CHECK_FAILED,
                                          None: Event.CHECK_INCONCLUSIVE}[passed]
