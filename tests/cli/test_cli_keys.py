"""``tml key add/ls/rm`` against the real switchboard."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")


@pytest_twisted.ensureDeferred
async def test_key_add_ls_rm(tml, switchboard, tmp_path: Path) -> None:
    alice = await switchboard.user("alice")
    env = switchboard.tml_env(tmp_path, alice.token)
    admin_env = switchboard.tml_env(tmp_path)
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@test",
                    "-f", str(key)], check=True)
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{key}.pub"],
                                 check=True, capture_output=True, text=True).stdout.split()[1]

    r = await tml("key", "add", str(key), env=env)  # the private key: refused locally
    assert r.status == 1 and "private key" in r.err, r.err
    r = await tml("key", "add", str(tmp_path / "missing.pub"), env=env)
    assert r.status == 1 and "cannot read" in r.err
    garbage = tmp_path / "bad.pub"
    garbage.write_text("ssh-ed25519 AAAA!!!! x\n")
    r = await tml("key", "add", str(garbage), env=env)
    assert r.status == 1 and "base64" in r.err, r.err

    r = await tml("key", "add", f"{key}.pub", env=env)
    assert r.status == 0, r.err
    assert fingerprint in r.out
    r = await tml("key", "ls", env=env)
    assert r.status == 0 and fingerprint in r.out and "alice@test" in r.out
    r = await tml("key", "ls", "--json", env=env)
    (listed,) = json.loads(r.out)["keys"]
    assert listed["fingerprint"] == fingerprint

    r = await tml("key", "ls", "--user", "alice", "--json", env=admin_env)
    assert [k["id"] for k in json.loads(r.out)["keys"]] == [listed["id"]]
    r = await tml("key", "add", f"{key}.pub", "--user", "admin", env=env)
    assert r.status == 1

    r = await tml("key", "rm", listed["id"], env=env)
    assert r.status == 0 and fingerprint in r.out
    r = await tml("key", "rm", listed["id"], env=env)
    assert r.status == 1
    r = await tml("key", "ls", "--json", env=env)
    assert json.loads(r.out)["keys"] == []


def test_a_key_file_saved_with_a_byte_order_mark_or_crlf_reads_as_its_key_line(
        tmp_path: Path) -> None:
    """Windows editors save .pub files with a UTF-8 BOM and CRLF line ends: the BOM
    made the switchboard refuse the key ('the key type must be one of …')."""
    from treadmill.cli.commands.keys import _read_key

    line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtRP5ak3/tChxm6wNOi2Xb4NRbjqucvYyv88BgETb9+ a@b"
    for name, data in (("bom.pub", b"\xef\xbb\xbf" + line.encode() + b"\r\n"),
                       ("crlf.pub", b"# mine\r\n" + line.encode() + b"\r\n")):
        (tmp_path / name).write_bytes(data)
        assert _read_key(str(tmp_path / name)).strip() == line
