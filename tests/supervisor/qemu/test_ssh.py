"""The test image's real SSH server, booted by the QEMU driver under TCG.

One VM serves every check: the job's keys (``JobStart.ssh_keys``) reach the
guest through the agent channel, the guest reports a host key made at boot,
and OpenSSH's client logs in with strict host-key checking against it, runs
commands, copies a file with ``scp`` and refuses a host that shows another key.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.supervisor.qemu.conftest import BuiltImage, needs_qemu
from tests.supervisor.qemu.support import job, start, within

pytestmark = [needs_qemu, pytest.mark.skipif(shutil.which("ssh") is None
                                             or shutil.which("ssh-keygen") is None,
                                             reason="no OpenSSH client")]


async def run(*argv: str) -> tuple[str, str, int]:
    out, err, code = await within(getProcessOutputAndValue(argv[0], argv[1:], env=os.environ,
                                                           reactor=reactor), 120)
    return out.decode(errors="replace"), err.decode(errors="replace"), code


async def keygen(path: Path) -> str:
    _, err, code = await run("/usr/bin/ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                             "tester", "-f", str(path))
    assert code == 0, err
    return Path(f"{path}.pub").read_text().strip()


def ssh_options(key: Path, known_hosts: Path, port: int) -> list[str]:
    return ["-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=guest",
            "-o", "ConnectTimeout=30", "-F", "/dev/null"]


@pytest_twisted.ensureDeferred
async def test_ssh_into_the_test_image(test_image: BuiltImage, work_dir: str,
                                       tmp_path: Path) -> None:
    key, stranger = tmp_path / "id", tmp_path / "stranger"
    public = await keygen(key)
    await keygen(stranger)
    spec = job(hang=1)
    spec["ssh_keys"] = [public]
    driver, reporter, _ = await start(test_image, work_dir, spec)
    try:
        await within(reporter.became_ready)
        await within(reporter.console_has(b"1 authorized ssh keys"))
        assert reporter.host_keys, "the guest reported no host key"
        [host_key] = reporter.host_keys[-1]
        assert host_key.startswith("ssh-ed25519 ")
        port = reporter.offered[-1]["ssh"][1]
        known = tmp_path / "known_hosts"
        known.write_text(f"guest {host_key}\n")
        ssh = ["/usr/bin/ssh", *ssh_options(key, known, port), "-p", str(port)]

        out, err, code = await run(*ssh, "root@127.0.0.1", "uname -a; exit 3")
        assert code == 3, err
        assert out.startswith("Linux ") and "cloud-amd64" in out, out

        # 10 MB with scp (its legacy protocol: the guest has OpenSSH's scp, no sftp-server).
        data = tmp_path / "blob"
        data.write_bytes(os.urandom(10 * 1024 * 1024))
        _, err, code = await run("/usr/bin/scp", "-O", "-q", *ssh_options(key, known, port),
                                 "-P", str(port), str(data), "root@127.0.0.1:/tmp/blob")
        assert code == 0, err
        out, err, code = await run(*ssh, "root@127.0.0.1", "sha256sum /tmp/blob")
        assert code == 0, err
        assert out.split()[0] == hashlib.sha256(data.read_bytes()).hexdigest()

        # A key the job does not carry gets nowhere.
        _, err, code = await run("/usr/bin/ssh", *ssh_options(stranger, known, port), "-p",
                                 str(port), "root@127.0.0.1", "true")
        assert code == 255 and "Permission denied" in err, err
        # A host showing another key than the reported one is refused before login.
        other = (await keygen(tmp_path / "other")).split()[:2]
        known.write_text(f"guest {' '.join(other)}\n")
        out, err, code = await run(*ssh, "root@127.0.0.1", "echo logged-in")
        assert code == 255 and "logged-in" not in out
        assert "HOST IDENTIFICATION HAS CHANGED" in err or "Host key verification failed" in err
    finally:
        await driver.stop(spec["id"], "user_terminated")
        await within(reporter.ended)
