"""An extended job's ``renew_tokens`` (protocol minor 8), built by the switchboard: when
it is due (:func:`outdated`, reconciliation case R4a of docs/protocol.md) and what it
carries (:func:`job_renewal`): tokens for the same log servers and proxies as the job's
``start_job``, living its new timeout plus its hold plus ``TOKEN_SLACK`` from now, and
refused by an attacker's view of them beyond that or for another job; for a held job
(minor 9) when the supervisor's hold is outdated (:func:`hold_outdated`, case R4b) and
what it then carries (the hold's end, tokens that outlive it)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock

from treadmill.common.captoken import CapabilityError, CapabilitySigner, CapabilityVerifier, key_id
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.jobstart import TOKEN_SLACK, job_renewal, job_start
from treadmill.switchboard.renewal import hold_outdated, outdated

JOB = str(uuid.uuid4())
ROW = {"id": uuid.UUID(JOB), "timeout": 600.0, "hold_on_failure": 120.0, "tags": [],
       "label": "", "image_digest": "sha256:" + "a" * 64, "image_name": None,
       "image_stores": [], "parameters": {}, "reservation": False, "results": None,
       "log_servers": ["http://logs-a:1", "http://logs-b:1"], "host_id": 7}
PROXIES = ("ws://proxy:1",)


def _renewal(minor: int, signer: CapabilitySigner | None, **row: Any) -> dict[str, Any] | None:
    return job_renewal({**ROW, **row}, minor=minor, host_name="h1", signer=signer,
                       log_service="logs", proxies=PROXIES, proxy_service="proxy")


def _signing() -> tuple[Clock, CapabilitySigner, dict[str, Any]]:
    """A clock at a plausible now, a signer on it, and the keys that verify it."""
    clock = Clock()
    clock.advance(1_765_000_000)
    private = Ed25519PrivateKey.generate()
    return (clock, CapabilitySigner(private, "treadmill", clock),
            {key_id(private.public_key()): private.public_key()})


@pytest.mark.parametrize(("reported", "due"), [
    (None, False),  # idle
    ({"id": JOB, "state": "ready", "stage": None}, False),  # minor 7: says no timeout
    ({"id": JOB, "state": "ready", "stage": None, "timeout": 600.0}, False),
    ({"id": JOB, "state": "ready", "stage": None, "timeout": 900.0}, False),
    ({"id": JOB, "state": "ready", "stage": None, "timeout": 60.0}, True),
    ({"id": JOB, "state": "terminating", "stage": None, "timeout": 60.0}, True),
    ({"id": str(uuid.uuid4()), "state": "ready", "stage": None, "timeout": 60.0}, False),
])
def test_a_lower_reported_timeout_of_the_same_job_is_due_a_renewal(reported, due) -> None:
    assert outdated(ROW, reported) is due
    assert outdated(None, reported) is False


def test_the_renewal_carries_fresh_tokens_for_the_new_end() -> None:
    clock, signer, keys = _signing()
    message = _renewal(protocol.RENEW_MINOR, signer)
    assert message is not None
    protocol.validate(message)
    assert (message["type"], message["job_id"], message["timeout"]) == ("renew_tokens", JOB,
                                                                         600.0)
    # The same services as the start's, each with a token for this job only.
    start = job_start(ROW, minor=protocol.MINOR, host_name="h1", signer=signer,
                      log_service="logs", proxies=PROXIES, proxy_service="proxy")
    for key in ("log_servers", "proxies"):
        assert [s["url"] for s in message[key]] == [s["url"] for s in start[key]]
    logs = CapabilityVerifier(keys, "treadmill", "logs", clock, leeway=0)
    proxy = CapabilityVerifier(keys, "treadmill", "proxy", clock, leeway=0)
    claims = logs.verify(message["log_servers"][0]["token"], "job", JOB, "append")
    assert claims.expires_at == clock.seconds() + 600 + 120 + TOKEN_SLACK
    proxy.verify(message["proxies"][0]["token"], "tunnel", JOB, "publish")
    # The attacker's view: another job, another action or service, or past its end.
    with pytest.raises(CapabilityError):
        logs.verify(message["log_servers"][0]["token"], "job", str(uuid.uuid4()), "append")
    with pytest.raises(CapabilityError):
        logs.verify(message["log_servers"][0]["token"], "job", JOB, "read")
    with pytest.raises(CapabilityError):
        proxy.verify(message["log_servers"][0]["token"], "tunnel", JOB, "publish")
    clock.advance(600 + 120 + TOKEN_SLACK + 1)
    with pytest.raises(CapabilityError):
        proxy.verify(message["proxies"][0]["token"], "tunnel", JOB, "publish")


def test_older_supervisors_get_none_and_no_signer_sends_no_tokens() -> None:
    signer = CapabilitySigner(Ed25519PrivateKey.generate(), "treadmill", Clock())
    assert _renewal(protocol.RENEW_MINOR - 1, signer) is None
    bare = _renewal(protocol.RENEW_MINOR, None)
    assert bare == protocol.renew_tokens(0, JOB, 600.0)
    # A job without a hold gets its tokens too.
    message = _renewal(protocol.RENEW_MINOR, signer, hold_on_failure=None)
    assert message is not None and set(message) >= {"log_servers", "proxies"}


# -- a held job's hold extended (minor 9) ------------------------------------------------

HELD = {"id": JOB, "due": False, "released": False, "timeout": 600.0, "held_for": 300.0}
"""The database's hold (``HELD_JOB``): 300 s left."""


@pytest.mark.parametrize(("status", "due"), [
    ({"held": JOB}, False),  # minor 8: says nothing of it
    ({"held": JOB, "held_for": 299.5, "held_timeout": 600.0}, False),  # the same hold
    ({"held": JOB, "held_for": 400.0, "held_timeout": 600.0}, False),  # ends later: stopped
    ({"held": JOB, "held_for": 200.0, "held_timeout": 600.0}, True),  # missed an extension
    ({"held": JOB, "held_for": 300.0, "held_timeout": 60.0}, True),  # ... of the job itself
    ({"held": str(uuid.uuid4()), "held_for": 1.0, "held_timeout": 60.0}, False),
    ({"job": None}, False),
])
def test_a_shorter_or_lower_reported_hold_is_due_a_renewal(status, due) -> None:
    assert hold_outdated(HELD, status) is due
    assert hold_outdated(None, status) is False
    assert hold_outdated({**HELD, "due": True}, status) is False  # it ends now instead


def test_a_held_jobs_renewal_says_the_holds_end_and_outlives_it() -> None:
    clock, signer, keys = _signing()
    message = _renewal(protocol.HOLD_RENEW_MINOR, signer, held_for=300.0)
    assert message is not None
    protocol.validate(message)
    assert (message["held_for"], message["timeout"]) == (300.0, 600.0)
    logs = CapabilityVerifier(keys, "treadmill", "logs", clock, leeway=0)
    claims = logs.verify(message["log_servers"][0]["token"], "job", JOB, "append")
    assert claims.expires_at == clock.seconds() + 300 + TOKEN_SLACK
    proxy = CapabilityVerifier(keys, "treadmill", "proxy", clock, leeway=0)
    proxy.verify(message["proxies"][0]["token"], "tunnel", JOB, "publish")
    # A supervisor that could not apply it gets none, nor does a hold that is over.
    assert _renewal(protocol.HOLD_RENEW_MINOR - 1, signer, held_for=300.0) is None
    assert _renewal(protocol.HOLD_RENEW_MINOR, signer, held_for=0.0) is None
    # A running job's renewal says nothing of a hold.
    running = _renewal(protocol.HOLD_RENEW_MINOR, signer, held_for=None)
    assert running is not None and "held_for" not in running
