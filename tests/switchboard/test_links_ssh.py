"""SSH keys over the supervisor link (protocol minor 5): the job's authorized keys in
``start_job``, the guest's host keys in ``job_endpoints``; neither below minor 5."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.support import start_switchboard
from tests.switchboard.support import add_host, connected_peer, job, submit
from tests.util.ssh import new_ssh_public_key
from treadmill.protocol import supervisor as protocol


@pytest.mark.parametrize("minor", [protocol.SSH_KEYS_MINOR - 1, protocol.SSH_KEYS_MINOR])
@pytest_twisted.ensureDeferred
async def test_keys_in_start_job_and_host_keys_reported(migrated_database: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        minor: int) -> None:
    # Both ends of this link run here: the negotiated minor is ``minor``.
    monkeypatch.setattr(protocol, "MINOR", minor)
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2)
    try:
        token = await add_host(sb)  # its supervisor connects once the job has its grants
        owner, manager = await sb.user("olive"), await sb.user("mona")
        lines = {name: new_ssh_public_key() for name in ("olive", "mona", "admin")}
        for name, client in (("olive", owner), ("mona", manager), ("admin", sb.admin)):
            assert (await client.post("/api/v1/keys", {"key": lines[name]})).status == 201
        await sb.admin.post("/api/v1/hosts/h1/grants", {"user": "olive", "privilege": "start"})
        job_id = await submit(sb, owner)
        assert (await owner.post(f"/api/v1/jobs/{job_id}/grants",
                                 {"user": "mona", "privilege": "manage"})).status == 201
        peer = await connected_peer(sb, token)
        # The keys are read when the host is told to start the job.
        start = (await peer.wait_for("start_job", job_id=job_id))[0]["job"]
        host_key = new_ssh_public_key()
        rid = 4242
        waiter: Deferred = Deferred()
        peer._acks[rid] = waiter
        peer.send(protocol.job_endpoints(rid, job_id, [], ssh_host_keys=[
            host_key + " comment-dropped-by-parsing-fails", "ssh-rsa AAAA", host_key]))
        assert (await waiter)["ok"]
        shown = (await job(sb, job_id))["ssh_host_keys"]
        if minor < protocol.SSH_KEYS_MINOR:
            assert "ssh_keys" not in start
            return
        assert sorted(start["ssh_keys"]) == sorted([f"{lines['olive']} olive",
                                                    f"{lines['mona']} mona"])
        # Only valid keys without a comment are kept, once each.
        assert shown == [host_key]
        assert (await owner.get(f"/api/v1/jobs/{job_id}")).body["ssh_host_keys"] == [host_key]
    finally:
        await sb.stop()
