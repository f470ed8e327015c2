"""``tml`` shows image kinds and host kinds, against the real switchboard."""

from __future__ import annotations

import json

import pytest_twisted

from tests.cli.support import DIGEST, register, store_env


@pytest_twisted.ensureDeferred
async def test_kinds_in_image_and_host_views(tml, switchboard, tmp_path):
    env = await store_env(switchboard, tmp_path)
    r = await register(tml, env, "vm", DIGEST, "--kind", "qemu")
    assert r.status == 0, r.err
    assert "kind:" in r.out and "qemu" in r.out
    r = await tml("image", "show", "vm", "--json", env=env)
    assert json.loads(r.out)["kind"] == "qemu"
    r = await tml("image", "update", "vm", "--kind", "board", "--json", env=env)
    assert r.status == 0 and json.loads(r.out)["kind"] == "board"
    r = await register(tml, env, "x", DIGEST, "--kind", "floppy")
    assert r.status == 2 and "floppy" in r.err
    r = await tml("admin", "host", "add", "h1", "--tag", "t", env=env)
    assert r.status == 0, r.err
    r = await tml("host", "ls", env=env)
    assert r.status == 0, r.err
    header, row = r.out.splitlines()[:2]
    assert "KINDS" in header and " any " in row  # no supervisor reported kinds yet
    # As a supervisor's status records them (tests/switchboard/test_image_kinds.py).
    await switchboard.service.store.pool.execute("UPDATE hosts SET kinds = '{qemu}'")
    r = await tml("host", "show", "h1", env=env)
    assert r.status == 0 and "kinds:" in r.out and "qemu" in r.out
    r = await tml("host", "show", "h1", "--json", env=env)
    assert json.loads(r.out)["kinds"] == ["qemu"]
