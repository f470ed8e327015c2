"""The wire JobStart built from a job's row: its fields and every version gate, and
that each message validates against the protocol's schema."""

from __future__ import annotations

from typing import Any

import pytest

from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.jobstart import job_start

JOB = "6f2d3c9a-0e1b-4c8d-9a7f-5b4e3d2c1a0f"
ROW: dict[str, Any] = {
    "id": JOB, "image_name": "demo/fw", "image_digest": "sha256:" + "a" * 64,
    "image_stores": ["https://store.example"], "timeout": 600.0, "tags": ["arm"],
    "label": "nightly", "host_id": 7, "log_servers": ["https://logs-1", "https://logs-2"],
    "results": {"pass": "PASS"}, "reservation": False,
    "parameters": {"A": {"value": "1"}, "S": {"value": "x", "secret": True}}}


class Signer:
    """Records what it signs; the token names its audience and access."""

    def __init__(self) -> None:
        self.signed: list[tuple[str, str, list[Any], float]] = []

    def sign(self, subject: str, audience: str, access: list[Any], ttl: float) -> str:
        self.signed.append((subject, audience, access, ttl))
        return f"{audience}:{access[0].type}:{','.join(access[0].actions)}"


def build(minor: int, **changes: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"minor": minor, "host_name": "rack-1", "signer": Signer(),
                               "log_service": "logs", "proxies": ["https://proxy"],
                               "proxy_service": "proxy", "ssh_keys": ["ssh-ed25519 AAAA a"]}
    options.update(changes)
    start = job_start(ROW, **options)
    protocol.validate(protocol.start_job(1, start))
    return dict(start)


def test_minor_0_carries_the_job_alone():
    assert build(0) == {
        "id": JOB, "timeout": 600.0, "tags": ["arm"], "label": "nightly",
        "image": {"digest": "sha256:" + "a" * 64, "name": "demo/fw",
                  "stores": ["https://store.example"]},
        "parameters": {"A": {"value": "1", "secret": False},
                       "S": {"value": "x", "secret": True}}}


@pytest.mark.parametrize(("minor", "keys"), [
    (1, {"log_servers"}), (2, {"log_servers", "proxies"}), (4, {"log_servers", "proxies"}),
    (5, {"log_servers", "proxies", "results", "ssh_keys"})])
def test_each_minor_adds_its_fields(minor, keys):
    assert set(build(minor)) - set(build(0)) == keys


def test_tokens_are_scoped_to_the_job():
    signer = Signer()
    start = build(5, signer=signer)
    assert start["log_servers"] == [{"url": "https://logs-1", "token": "logs:job:append"},
                                    {"url": "https://logs-2", "token": "logs:job:append"}]
    assert start["proxies"] == [{"url": "https://proxy", "token": "proxy:tunnel:publish"}]
    assert {(s[0], s[2][0].name, s[3]) for s in signer.signed} == {("host:rack-1", JOB, 4200.0)}


def test_no_signer_no_services_and_a_reservation_parameter():
    start = job_start({**ROW, "reservation": True, "results": None}, minor=5,
                      host_name="rack-1", signer=None, log_service="logs", proxies=["p"],
                      proxy_service="proxy")
    assert set(start) == {"id", "timeout", "tags", "label", "image", "parameters"}
    assert start["parameters"][protocol.RESERVATION_PARAMETER] == {"value": "true",
                                                                   "secret": False}


@pytest.mark.parametrize("minor", [5, 6])
def test_hold_on_failure_goes_to_minor_6_and_its_tokens_outlive_the_hold(minor):
    signer = Signer()
    start = job_start({**ROW, "hold_on_failure": 1800.0}, minor=minor, host_name="rack-1",
                      signer=signer, log_service="logs", proxies=["https://proxy"],
                      proxy_service="proxy")
    protocol.validate(protocol.start_job(1, start))
    held = minor >= protocol.HOLD_MINOR
    assert start.get("hold_on_failure") == (1800.0 if held else None)
    ttl = 600.0 + 3600.0 + (1800.0 if held else 0.0)
    assert {s[3] for s in signer.signed} == {ttl}
    # Without a hold, nothing is sent; tokens never outlive captoken.MAX_TTL.
    assert "hold_on_failure" not in build(minor)
    long = job_start({**ROW, "timeout": 7 * 86400.0, "hold_on_failure": 86400.0}, minor=6,
                     host_name="rack-1", signer=signer, log_service="logs", proxies=[],
                     proxy_service="proxy")
    assert long["hold_on_failure"] == 86400.0 and signer.signed[-1][3] == 8 * 86400.0
