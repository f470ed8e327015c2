"""The wire ``JobStart`` (:class:`treadmill.protocol.supervisor.JobStart`) of a job.

:meth:`Store.job_start <treadmill.switchboard.store.Store.job_start>` reads the job's
row; :func:`job_start` turns it into the message for a supervisor that speaks
protocol minor ``minor``, with the capability tokens it carries, and
:func:`job_renewal` into the ``renew_tokens`` of an extended job (minor 8), or of an
ended job whose hold was extended (minor 9): the same tokens, fresh. Every version gate
of the two messages is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from treadmill.common.captoken import MAX_TTL, Access, CapabilitySigner
from treadmill.protocol import supervisor as protocol
from treadmill.protocol.supervisor import RESERVATION_PARAMETER, JobStart, ServiceURL

TOKEN_SLACK = 3600.0
"""Seconds the tokens of a start outlive the job's timeout (logs are shipped after it)."""


def _tokens(row: dict[str, Any], lifetime: float, *, minor: int, host_name: str,
            signer: CapabilitySigner | None, log_service: str, proxies: Sequence[str],
            proxy_service: str) -> dict[str, list[ServiceURL]]:
    """The job's ``log_servers`` and ``proxies``, each with a token living ``lifetime``
    seconds (what is left of the job and its hold) plus :data:`TOKEN_SLACK` from now (the
    keys a supervisor of ``minor`` knows)."""
    job_id = str(row["id"])
    ttl = min(lifetime + TOKEN_SLACK, MAX_TTL)
    tokens: dict[str, list[ServiceURL]] = {}
    if minor >= 1 and row["log_servers"] and signer is not None:
        # One write token for every replica: append to this job's streams only.
        token = signer.sign(f"host:{host_name}", log_service,
                            [Access("job", job_id, ("append",))], ttl)
        tokens["log_servers"] = [{"url": url, "token": token} for url in row["log_servers"]]
    if minor >= 2 and proxies and signer is not None:
        token = signer.sign(f"host:{host_name}", proxy_service,
                            [Access("tunnel", job_id, ("publish",))], ttl)
        tokens["proxies"] = [{"url": url, "token": token} for url in proxies]
    return tokens


def job_start(row: dict[str, Any], *, minor: int, host_name: str,
              signer: CapabilitySigner | None, log_service: str, proxies: Sequence[str],
              proxy_service: str, ssh_keys: list[str] | None = None) -> JobStart:
    """The ``start_job`` payload for the job of ``row`` on host ``host_name``.

    Log servers come with one append token for every replica (minor 1), proxies
    with a publish token (minor 2); the console patterns and ``ssh_keys`` (the
    job's authorized keys) go to minor 5 and later, ``hold_on_failure`` to minor 6
    and later (an older supervisor tears a failed job's host down as before). Without
    a ``signer`` no tokens, hence no log servers or proxies, are sent.
    """
    start: JobStart = {
        "id": row["id"], "timeout": row["timeout"], "tags": row["tags"], "label": row["label"],
        "image": {"digest": row["image_digest"], "name": row["image_name"],
                  "stores": list(row["image_stores"])},
        "parameters": {name: {"value": p["value"], "secret": bool(p.get("secret"))}
                       for name, p in row["parameters"].items()}}
    if row["reservation"]:  # The host's driver holds it (docs/jobs.md, Reservations).
        start["parameters"][RESERVATION_PARAMETER] = {"value": "true", "secret": False}
    hold = row.get("hold_on_failure") if minor >= protocol.HOLD_MINOR else None
    if hold:  # A held job's host publishes and ships logs until its hold ends.
        start["hold_on_failure"] = hold
    tokens = _tokens(row, row["timeout"] + (hold or 0.0), minor=minor, host_name=host_name,
                     signer=signer, log_service=log_service, proxies=proxies,
                     proxy_service=proxy_service)
    if "log_servers" in tokens:
        start["log_servers"] = tokens["log_servers"]
    if "proxies" in tokens:
        start["proxies"] = tokens["proxies"]
    if minor >= protocol.RESULTS_MINOR and row["results"]:
        start["results"] = row["results"]
    if minor >= protocol.SSH_KEYS_MINOR and ssh_keys is not None:
        start["ssh_keys"] = ssh_keys
    return start


def job_renewal(row: dict[str, Any], *, minor: int, host_name: str,
                signer: CapabilitySigner | None, log_service: str, proxies: Sequence[str],
                proxy_service: str) -> dict[str, Any] | None:
    """The ``renew_tokens`` of the extended job of ``row`` (its :func:`job_start` tokens,
    issued now for its new timeout), or None for a supervisor older than minor 8.

    For an ended job whose host is held (``row["held_for"]``, the seconds its hold has
    left) it says when the hold now ends (``held_for``, minor 9) and its tokens live that
    long plus :data:`TOKEN_SLACK`; a supervisor older than minor 9 gets None (it could
    not apply them to a held job), as does a hold that is over."""
    if minor < protocol.RENEW_MINOR:
        return None
    held_for = row.get("held_for")
    if held_for is not None:
        if minor < protocol.HOLD_RENEW_MINOR or held_for <= 0:
            return None
        tokens = _tokens(row, held_for, minor=minor, host_name=host_name, signer=signer,
                         log_service=log_service, proxies=proxies, proxy_service=proxy_service)
        return protocol.renew_tokens(0, str(row["id"]), row["timeout"], held_for=held_for,
                                     **tokens)
    hold = row.get("hold_on_failure") if minor >= protocol.HOLD_MINOR else None
    tokens = _tokens(row, row["timeout"] + (hold or 0.0), minor=minor, host_name=host_name,
                     signer=signer, log_service=log_service, proxies=proxies,
                     proxy_service=proxy_service)
    return protocol.renew_tokens(0, str(row["id"]), row["timeout"], **tokens)
