"""Fresh tokens for an extended job on its host (``renew_tokens``, protocol minor 8).

A job's ``start_job`` tokens (log shipping, proxy publishing) live its timeout plus its
hold plus an hour (:mod:`treadmill.switchboard.jobstart`). Extending the job
(``POST /api/v1/jobs/{id}/extend``) raises its timeout, so :func:`renew_tokens` sends
its supervisor new ones: when the extension commits (its ``extended`` notification
reaches the instance holding the host's link) and at every reconciliation whose
``status`` reports a lower timeout than the database's (:func:`outdated`: a link that
was down at the extension, or a lost notification). A supervisor older than minor 8 gets
nothing and keeps its first tokens.

Extending an ended job's hold does the same (minor 9): the ``renew_tokens`` also says
when the hold now ends (``held_for``), and tokens live that long plus an hour. A
reconciliation whose ``status`` reports a held job with a lower timeout or a hold that
ends sooner than the database's (:func:`hold_outdated`: the extension was missed, or the
job ended into its hold while the link was down, so that the database's hold began
later) sends it too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import TimeoutError
from twisted.logger import Logger

from treadmill.switchboard.jobstart import job_renewal

log = Logger()


def outdated(row: dict[str, Any] | None, reported: dict[str, Any] | None) -> bool:
    """Whether the supervisor's job (``reported``, its ``status.job``) is the database's
    (``row``, with ``timeout``) with a lower timeout than that: then it needs tokens."""
    return (row is not None and reported is not None and reported["id"] == str(row["id"])
            and "timeout" in reported and reported["timeout"] < row["timeout"])


HOLD_DRIFT = 1.0
"""Seconds a supervisor's hold may end before the database's without a renewal (the
time between the two clocks' reading of it)."""


def hold_outdated(row: dict[str, Any] | None, answer: dict[str, Any]) -> bool:
    """Whether the hold the supervisor reports (``answer``, its ``status``: ``held``,
    ``held_for`` and ``held_timeout``, minor 9) is the database's (``row``,
    :data:`~treadmill.switchboard.store.holds.HELD_JOB`, not due) with a lower timeout or
    ending more than :data:`HOLD_DRIFT` seconds sooner: then it needs tokens and the end."""
    if row is None or row["due"] or answer.get("held") != str(row["id"]):
        return False
    held_for, timeout = answer.get("held_for"), answer.get("held_timeout")
    return ((held_for is not None and held_for + HOLD_DRIFT < row["held_for"])
            or (timeout is not None and timeout < row["timeout"]))


async def renew_tokens(link: Any, job_id: str) -> None:
    """Send the supervisor of ``link`` (a ``SupervisorSession``) fresh tokens for its job
    ``job_id``, if it still runs it there and speaks minor 8 (or holds its host and speaks
    minor 9: then with the hold's end, see :func:`job_renewal`). Without an answer in time
    (or with the link gone) the next reconciliation sends them again."""
    links = link.links
    row = await links.store.job_start(job_id)
    if row is None or row["host_id"] != link.host_id:
        return
    message = job_renewal(row, minor=link.minor, host_name=link.host_name,
                          signer=links.signer, log_service=links.log_service,
                          proxies=links.proxies, proxy_service=links.proxy_service)
    if message is None:
        return
    try:
        answer = await link.request(message)
    except (TimeoutError, ConnectionError) as e:
        log.info("{host}: fresh tokens for job {job} not acknowledged ({error}); the next "
                 "reconciliation sends them again", host=link.host_name, job=job_id,
                 error=type(e).__name__)
        return
    if answer["ok"] and message.get("held_for") is not None:
        log.info("{host}: fresh tokens for held job {job} (its hold ends in {left:.0f} s)",
                 host=link.host_name, job=job_id, left=message["held_for"])
    elif answer["ok"]:
        log.info("{host}: fresh tokens for extended job {job} (timeout {timeout:g} s)",
                 host=link.host_name, job=job_id, timeout=row["timeout"])
    else:
        log.warn("{host} refused the fresh tokens of job {job}: {error}",
                 host=link.host_name, job=job_id, error=answer.get("error"))
