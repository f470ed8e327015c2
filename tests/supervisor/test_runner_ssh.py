"""The guest's SSH host keys travel with the job's endpoints, from protocol minor 5 on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.supervisor.support import ENDPOINTS, Harness
from treadmill.protocol import supervisor as protocol

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBERERERERERERERERERERERERERERERERERERERERER"


@pytest.mark.parametrize("minor", [protocol.SSH_KEYS_MINOR - 1, protocol.SSH_KEYS_MINOR])
def test_host_keys_go_with_the_endpoints(tmp_path: Path, minor: int) -> None:
    h = Harness(tmp_path, hang=True)
    h.conn.minor = minor
    h.start()
    cur = h.runner._current
    assert cur is not None
    job_id = cur.id
    h.runner.report_endpoints(job_id, ENDPOINTS)
    cur.reporter.ssh_host_keys([KEY])
    h.clock.advance(0)
    sent = [m for _, m in h.conn.sent if m["type"] == "job_endpoints"]
    assert [m["endpoints"] for m in sent] == [ENDPOINTS] * len(sent)
    for message in sent:
        protocol.validate(message)
    if minor < protocol.SSH_KEYS_MINOR:
        assert not any("ssh_host_keys" in m for m in sent)
        return
    assert sent[-1]["ssh_host_keys"] == [KEY]
    # The same keys again send nothing; they are resent with later endpoints.
    count = len(sent)
    cur.reporter.ssh_host_keys([KEY])
    assert len([m for _, m in h.conn.sent if m["type"] == "job_endpoints"]) == count
    h.runner.report_endpoints(job_id, [])
    last = [m for _, m in h.conn.sent if m["type"] == "job_endpoints"][-1]
    assert last["endpoints"] == [] and last["ssh_host_keys"] == [KEY]
