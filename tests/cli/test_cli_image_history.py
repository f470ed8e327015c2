"""``tml image register/push --replace``, ``history`` and ``rollback`` against the real
switchboard."""

from __future__ import annotations

import json

import pytest_twisted

from tests.cli.support import register, store_env

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest_twisted.ensureDeferred
async def test_replace_history_and_rollback(tml, switchboard, tmp_path):
    env = await store_env(switchboard, tmp_path)
    r = await register(tml, env, "team/demo", D1, "--kind", "qemu")
    assert r.status == 0, r.err
    # Registering to an existing name without --replace is refused, and says why.
    r = await register(tml, env, "team/demo", D2, "--kind", "qemu")
    assert r.status == 1 and "--replace" in r.err and "tml image history team/demo" in r.err
    r = await tml("image", "show", "team/demo", "--json", env=env)
    assert json.loads(r.out)["digest"] == D1
    r = await register(tml, env, "team/demo", D2, "--kind", "board", "--replace")
    assert r.status == 0, r.err
    r = await tml("image", "history", "team/demo", env=env)
    assert r.status == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["VERSION", "DIGEST", "KIND"]
    assert lines[1].split()[:3] == ["*2", D2[:19], "board"] and "replaced" in lines[1]
    assert lines[2].split()[:3] == ["1", D1[:19], "qemu"] and "created" in lines[2]
    r = await tml("image", "rollback", "team/demo", "1", "--json", env=env)
    assert r.status == 0, r.err
    assert json.loads(r.out)["digest"] == D1 and json.loads(r.out)["kind"] == "qemu"
    r = await tml("image", "history", "team/demo", "--json", env=env)
    versions = json.loads(r.out)["versions"]
    assert [(v["version"], v["digest"], v["by"]) for v in versions] == [
        (3, D1, "admin"), (2, D2, "admin"), (1, D1, "admin")]
    r = await tml("image", "rollback", "team/demo", "9", env=env)
    assert r.status == 1 and "no version 9" in r.err
    r = await tml("image", "rollback", "team/demo", "0", env=env)
    assert r.status == 2
