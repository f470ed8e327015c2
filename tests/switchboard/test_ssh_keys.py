"""Users' SSH public keys: strict parsing, the /api/v1/keys routes, limits and who sees what."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from tests.support import RunningSwitchboard
from treadmill.common import sshkeys
from treadmill.switchboard.api.keys import MAX_SSH_KEYS

HAVE_KEYGEN = shutil.which("ssh-keygen") is not None


def keygen(tmp_path: Path, kind: str, bits: int | None = None,
           comment: str = "") -> tuple[str, str]:
    """A key pair made by ``ssh-keygen``: (public line, ``ssh-keygen -l`` fingerprint)."""
    path = tmp_path / f"k-{kind}-{bits}-{len(list(tmp_path.iterdir()))}"
    cmd = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
    if bits:
        cmd += ["-b", str(bits)]
    subprocess.run(cmd, check=True)
    line = Path(f"{path}.pub").read_text()
    listed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{path}.pub"],
                            check=True, capture_output=True, text=True).stdout
    return line.strip(), listed.split()[1]


def _wire(*fields: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(f)) + f for f in fields)).decode()


ED = _wire(b"ssh-ed25519", b"\x11" * 32)
EC = _wire(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" + b"\x01" * 64)

BAD_KEYS = [
    ("empty", ""),
    ("type only", "ssh-ed25519"),
    ("unknown type", f"ssh-dss {ED}"),
    ("type missing", ED),
    ("not base64", "ssh-ed25519 AAAA$$$$"),
    ("extra padding", f"ssh-ed25519 {ED}="),
    ("no padding", "ecdsa-sha2-nistp256 " + EC.rstrip("=")),
    ("non-canonical base64", "ecdsa-sha2-nistp256 " + EC[:-2] + chr(ord(EC[-2]) + 1) + "="),
    ("embedded type differs", f"ssh-rsa {ED}"),
    ("truncated body", "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed").decode()),
    ("short ed25519", "ssh-ed25519 " + _wire(b"ssh-ed25519", b"\x11" * 31)),
    ("trailing data", "ssh-ed25519 " + _wire(b"ssh-ed25519", b"\x11" * 32, b"x")),
    ("curve differs", "ecdsa-sha2-nistp256 " + _wire(b"ecdsa-sha2-nistp256", b"nistp384",
                                                     b"\x04" + b"\x01" * 64)),
    ("point off the curve", "ecdsa-sha2-nistp256 " + _wire(b"ecdsa-sha2-nistp256", b"nistp256",
                                                           b"\x04" + b"\x01" * 64)),
    ("rsa 1024", "ssh-rsa " + _wire(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xc3" * 128)),
    ("two lines", f"ssh-ed25519 {ED}\nssh-ed25519 {ED}"),
    ("control in comment", f"ssh-ed25519 {ED} a\x1bb"),
    ("C1 control in comment", f"ssh-ed25519 {ED} a\x9bb"),
    ("bidi override in comment", f"ssh-ed25519 {ED} alice\u202e@evil"),
    ("bidi isolate in comment", f"ssh-ed25519 {ED} a\u2067b"),
    ("zero-width space in comment", f"ssh-ed25519 {ED} ali\u200bce"),
    ("line separator in comment", f"ssh-ed25519 {ED} a\u2028b"),
    ("private use in comment", f"ssh-ed25519 {ED} a\ue000b"),
    ("long comment", f"ssh-ed25519 {ED} " + "c" * 300),
    ("too long", "ssh-rsa " + "A" * 9000),
    ("options prefix", f'command="sh" ssh-ed25519 {ED}'),
]


@pytest.mark.parametrize("text", [t for _, t in BAD_KEYS], ids=[n for n, _ in BAD_KEYS])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(sshkeys.BadKey) as e:
        sshkeys.parse(text)
    assert ED not in str(e.value)


def test_a_comment_may_be_any_visible_text() -> None:
    for comment in ("José Müller <jm@例え.jp>", "ключ ноутбука", "a  b", "🔑 laptop"):
        assert sshkeys.parse(f"ssh-ed25519 {ED} {comment}").comment == comment


@pytest.mark.skipif(not HAVE_KEYGEN, reason="no ssh-keygen")
def test_parse_matches_ssh_keygen(tmp_path: Path) -> None:
    for kind, bits in (("ed25519", None), ("ecdsa", 256), ("ecdsa", 384), ("ecdsa", 521),
                       ("rsa", 2048)):
        line, fingerprint = keygen(tmp_path, kind, bits, "me@laptop")
        key = sshkeys.parse(line)
        assert key.fingerprint == fingerprint
        assert key.comment == "me@laptop"
        assert line.startswith(key.line)
    line, _ = keygen(tmp_path, "rsa", 1024)
    with pytest.raises(sshkeys.BadKey, match="2048"):
        sshkeys.parse(line)


@pytest_twisted.ensureDeferred
async def test_keys_api(switchboard: RunningSwitchboard, tmp_path: Path) -> None:
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    line, fingerprint = keygen(tmp_path, "ed25519", comment="alice@laptop")

    for name, text in BAD_KEYS:
        r = await alice.post("/api/v1/keys", {"key": text})
        assert r.status == 400, (name, r.body)
        assert r.error == "bad_request"
    for body in ({}, {"key": 5}, {"key": line, "extra": 1}, [line]):
        r = await alice.post("/api/v1/keys", body)
        assert r.status == 400, (body, r.body)
    assert (await alice.get("/api/v1/keys")).body == {"keys": []}

    r = await alice.post("/api/v1/keys", {"key": line + "\n"})
    assert r.status == 201, r.body
    key = r.body
    assert key["fingerprint"] == fingerprint and key["comment"] == "alice@laptop"
    assert key["user"] == "alice" and key["type"] == "ssh-ed25519"
    assert line.startswith(key["key"])
    again = await alice.post("/api/v1/keys", {"key": line})
    assert again.status == 409
    # The same key is another user's to register too.
    assert (await bob.post("/api/v1/keys", {"key": line})).status == 201

    # Bob sees only his keys and cannot touch Alice's: 404, as for a missing key.
    bob_keys = (await bob.get("/api/v1/keys")).body["keys"]
    assert [k["user"] for k in bob_keys] == ["bob"]
    assert (await bob.get("/api/v1/keys?user=alice")).status == 403
    assert (await bob.post("/api/v1/keys?user=alice", {"key": line})).status == 403
    assert (await bob.delete(f"/api/v1/keys/{key['id']}")).status == 404
    assert (await bob.delete("/api/v1/keys/not-a-uuid")).status == 404
    assert [k["id"] for k in (await alice.get("/api/v1/keys")).body["keys"]] == [key["id"]]

    # An admin manages anyone's.
    admin = switchboard.admin
    listed = await admin.get("/api/v1/keys?user=alice")
    assert [k["id"] for k in listed.body["keys"]] == [key["id"]]
    other, _ = keygen(tmp_path, "ecdsa", 256)
    r = await admin.post("/api/v1/keys?user=alice", {"key": other})
    assert r.status == 201 and r.body["user"] == "alice"
    assert (await admin.get("/api/v1/keys?user=nobody")).status == 404
    assert (await admin.delete(f"/api/v1/keys/{r.body['id']}")).status == 200
    assert (await alice.delete(f"/api/v1/keys/{key['id']}")).status == 200
    assert (await alice.delete(f"/api/v1/keys/{key['id']}")).status == 404
    assert (await alice.get("/api/v1/keys")).body == {"keys": []}


@pytest_twisted.ensureDeferred
async def test_key_count_is_bounded(switchboard: RunningSwitchboard) -> None:
    from tests.util.ssh import new_ssh_public_key

    carol = await switchboard.user("carol")
    for _ in range(MAX_SSH_KEYS):
        assert (await carol.post("/api/v1/keys", {"key": new_ssh_public_key()})).status == 201
    r = await carol.post("/api/v1/keys", {"key": new_ssh_public_key()})
    assert r.status == 409 and str(MAX_SSH_KEYS) in r.body["error"]["message"]
    assert len((await carol.get("/api/v1/keys")).body["keys"]) == MAX_SSH_KEYS


@pytest_twisted.ensureDeferred
async def test_job_keys_are_the_owners_and_managers(switchboard: RunningSwitchboard) -> None:
    from tests.util.ssh import new_ssh_public_key

    store = switchboard.store
    await switchboard.register_store("http://store.example", "s")
    users = {name: await switchboard.user(name) for name in ("dan", "erin", "fay", "gus")}
    lines = {}
    for name, client in users.items():
        lines[name] = new_ssh_public_key()
        assert (await client.post("/api/v1/keys", {"key": lines[name]})).status == 201
    dan_id = await store.user_id("dan")
    await store.create_image("img", "sha256:" + "ab" * 32, ["http://store.example"], dan_id, "")
    r = await users["dan"].post("/api/v1/jobs", {"image": "img"})
    assert r.status == 201, r.body
    job = r.body["id"]
    assert r.body["ssh_host_keys"] == []
    for user, privilege in (("erin", "manage"), ("fay", "read"), ("*", "manage")):
        r = await users["dan"].post(f"/api/v1/jobs/{job}/grants",
                                    {"user": user, "privilege": privilege})
        assert r.status in (200, 201), r.body
    keys = await store.job_ssh_keys(job)
    assert sorted(k.split()[2] for k in keys) == ["dan", "erin"]
    assert {" ".join(k.split()[:2]) for k in keys} == {lines["dan"], lines["erin"]}


@pytest_twisted.ensureDeferred
async def test_refusals_say_what_and_keep_nothing(switchboard: RunningSwitchboard) -> None:
    from tests.util.ssh import new_ssh_public_key

    dora = await switchboard.user("dora")
    r = await dora.get("/api/v1/keys?user=admin")
    assert r.status == 403 and "SSH keys" in r.body["error"]["message"]
    r = await dora.post("/api/v1/keys", {"key": "ssh-ed25519 AAAA!!!! dora"})
    assert r.status == 400 and "AAAA!!!!" not in r.body["error"]["message"]
    r = await dora.post("/api/v1/keys", raw=b"ssh-ed25519 AAAA")
    assert r.status in (400, 415)
    assert (await dora.get("/api/v1/keys")).body == {"keys": []}
    ok = await dora.post("/api/v1/keys", {"key": new_ssh_public_key()})
    assert ok.status == 201
