"""The manhole of a real ``twistd treadmill-switchboard``, over OpenSSH without a pty:
its helpers list, drain and revoke, and the API sees the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.conch.ssh import keys

from tests.support import run_tml, write_switchboard_config
from tests.util.daemons import Daemon, bootstrap_admin
from tests.util.ports import free_port
from tests.util.ssh import SSH, make_client_key, ssh_exec

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SSH is None, reason="no OpenSSH client installed")]


@pytest_twisted.ensureDeferred
async def test_switchboard_manhole_helpers(database: str, tmp_path: Path) -> None:
    port, manhole_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    key = tmp_path / "id_operator"
    client_key = make_client_key(key)
    public = client_key.public().toString("openssh").decode()
    (tmp_path / "authorized_keys").write_text(public + " operator\n")
    config = write_switchboard_config(tmp_path / "switchboard.toml", database, port, tmp_path)
    with config.open("a") as f:
        f.write("[manhole]\n"
                f'listen = ["tcp:{manhole_port}:interface=127.0.0.1"]\n'
                f'authorized_keys = "{tmp_path / "authorized_keys"}"\n'
                f'host_key = "{tmp_path / "manhole_host_key"}"\n')
    daemon = Daemon("treadmill-switchboard", ["--config", str(config)])
    daemon.start()
    try:
        await daemon.wait_http(f"{url}/healthz")
        admin = await bootstrap_admin("--config", str(config))
        code, out = await run_tml(url, admin, "admin", "host", "add", "board-1", "--tag", "qemu")
        assert code == 0, out
        code, out = await run_tml(url, admin, "job", "submit", "sha256:" + "1" * 64,
                                  "--tag", "qemu")
        assert code == 0, out
        job = out.strip().splitlines()[-1].split()[-1]

        # Listing: helpers are coroutine functions, awaited for us; json for the test.
        out, code = await ssh_exec(manhole_port, key, "import json\n"
                                   "print(json.dumps(await list_jobs(), default=str))\n"
                                   "print(json.dumps(await list_hosts(), default=str))\n"
                                   "list_links()")
        assert code == 0, out
        jobs, hosts, links = out.splitlines()
        assert [(j["id"], j["state"], j["owner"]) for j in json.loads(jobs)] == \
            [(job, "queued", "root")]
        assert [(h["name"], h["enabled"]) for h in json.loads(hosts)] == [("board-1", True)]
        assert links == "[]"

        # Draining is what the API then shows.
        out, code = await ssh_exec(manhole_port, key, "(await drain('board-1'))['enabled']")
        assert (out, code) == ("False\n", 0)
        response = await treq.get(f"{url}/api/v1/hosts/board-1",
                                  headers={"Authorization": f"Bearer {admin}"})
        assert response.code == 200 and (await response.json())["enabled"] is False
        # The record names the operator: the SSH user and the key's fingerprint, as the
        # daemon logged the login and as the session's `operator` says.
        fingerprint = client_key.public().fingerprint(keys.FingerprintFormats.SHA256_BASE64)
        response = await treq.get(f"{url}/api/v1/audit?host=board-1&action=host.drain",
                                  headers={"Authorization": f"Bearer {admin}"})
        (record,) = (await response.json())["entries"]
        assert (record["actor"], record["details"]) == (
            "manhole", {"operator": f"operator {fingerprint}"})
        assert f"manhole login: operator {fingerprint}" in daemon.output
        out, code = await ssh_exec(manhole_port, key, "operator")
        assert (out, code) == (f"'operator {fingerprint}'\n", 0)

        # A missing host is an error with status 1, not a silent success.
        out, code = await ssh_exec(manhole_port, key, "await drain('no-such-host')")
        assert code == 1 and "no host 'no-such-host'" in out

        # Revoking the admin's token shuts it out of the API at once.
        out, code = await ssh_exec(
            manhole_port, key,
            "user = await store.get_user('root')\n"
            "(token,) = await store.list_tokens(user['id'])\n"
            "(await revoke_token(str(token['id'])))['revoked_at'] is not None")
        assert (out, code) == ("True\n", 0), out
        response = await treq.get(f"{url}/api/v1/hosts/board-1",
                                  headers={"Authorization": f"Bearer {admin}"})
        assert response.code == 401
        assert admin not in daemon.output
    finally:
        await daemon.stop()
