"""What the daemons write is not readable by other local users (security issue 12).

Real daemons under twistd, with ``--logfile``: every file and directory they create
has no permission for others, and none for the group except the image store's
shared layout (blobs 0440, files 0640, directories 0750).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.imagestore.support import Registry, write_config
from tests.logserver.support import Keys as LogKeys
from tests.logserver.support import LogClient, new_job
from tests.util.daemons import Daemon
from tests.util.ports import free_port
from treadmill.common.daemon import UMASK, restrict_umask


@pytest.fixture
def umask() -> Iterator[None]:
    saved = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(saved)


def test_restrict_umask_adds_and_keeps_stricter(umask: None) -> None:
    assert UMASK == 0o077
    assert restrict_umask() == 0o077
    assert os.umask(0o027) == 0o077
    assert restrict_umask() == 0o077
    os.umask(0o177)
    assert restrict_umask() == 0o177  # a unit's stricter UMask= stays


def modes(root: Path) -> dict[str, int]:
    """Every path under ``root`` (and ``root``) with its permission bits."""
    found = {str(root): stat.S_IMODE(root.stat().st_mode)}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[path] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


@pytest_twisted.ensureDeferred
async def test_a_log_server_writes_streams_and_its_log_for_itself(tmp_path: Path) -> None:
    keys = LogKeys(tmp_path)
    port = free_port()
    root, logfile = tmp_path / "logs", tmp_path / "var" / "logserver.log"
    logfile.parent.mkdir()
    daemon = Daemon("treadmill-logserver", [
        "--root", str(root), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--auth-keys-file", str(keys.keys_file)], twistd_args=[f"--logfile={logfile}"])
    daemon.start()
    try:
        url = f"http://127.0.0.1:{port}"
        await daemon.wait_http(f"{url}/healthz")
        job = new_job()
        answer = await LogClient(url).append(job, "console", 0, b"secret console output",
                                             keys.token(job, "append"))
        assert answer.code == 200
    finally:
        await daemon.stop()
    found = modes(root)
    assert any(path.endswith("console") or "console" in path for path in found), found
    leaky = {p: oct(m) for p, m in found.items() if m & 0o077}
    assert leaky == {}, "readable by group or others"
    assert stat.S_IMODE(logfile.stat().st_mode) & 0o077 == 0
    assert logfile.stat().st_size > 0


@pytest_twisted.ensureDeferred
async def test_an_image_store_shares_its_layout_with_its_group_only(tmp_path: Path) -> None:
    port = free_port()
    root = tmp_path / "root"
    config = write_config(tmp_path / "imagestore.toml", root, port, None)
    daemon = Daemon("treadmill-imagestore", ["--config", str(config)],
                    twistd_args=[f"--logfile={tmp_path / 'imagestore.log'}"])
    daemon.start()
    try:
        url = f"http://127.0.0.1:{port}"
        await daemon.wait_http(f"{url}/healthz")
        digest, _ = await Registry(url).push_image("lab/fw", "v1", [b"firmware " * 100])
        assert digest
    finally:
        await daemon.stop()
    found = modes(root)
    blobs = [p for p in found if "/blobs/sha256/" in p and os.path.isfile(p)]
    assert len(blobs) >= 3, found
    assert all(found[p] == 0o440 for p in blobs), {p: oct(found[p]) for p in blobs}
    assert {p: oct(m) for p, m in found.items() if m & 0o027} == {}, "others read nothing"
    assert stat.S_IMODE((tmp_path / "imagestore.log").stat().st_mode) & 0o077 == 0


def test_devstack_daemon_logs_are_private(tmp_path: Path, umask: None) -> None:
    import sys

    from treadmill.dev.devstack import Devstack, Role

    stack = Devstack(tmp_path / "state", free_port())
    for path in (stack.logs, stack.run):
        path.mkdir(parents=True)
    role = Role("echo", "", tmp_path / "none.toml",
                argv=[sys.executable, "-c", "print('token tmt_secret')"])
    stack.start_role(role)
    assert stack._procs["echo"].wait(timeout=30) == 0
    log = stack.logs / "echo.log"
    assert log.read_text() == "token tmt_secret\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_a_supervisor_keeps_its_state_to_itself(tmp_path: Path) -> None:
    import signal

    from tests.supervisor.peer import FakeSwitchboard, quick_job_ready

    peer = FakeSwitchboard().listen()
    token = tmp_path / "token"
    token.write_text("host-token\n")
    token.chmod(0o600)
    config = tmp_path / "supervisor.toml"
    config.write_text((Path(__file__).parents[2] / "etc" / "treadmill"
                       / "supervisor-mock.toml").read_text())
    logfile = tmp_path / "supervisor.log"
    daemon = Daemon("treadmill-supervisor", [
        "--config", str(config), "--switchboard-url", peer.url,
        "--switchboard-token-file", str(token), "--state-dir", str(tmp_path / "state"),
        "--mock-run-time", "inf", "--reconnect-initial", "0.1"],
        twistd_args=[f"--logfile={logfile}"])
    daemon.start()
    try:
        await quick_job_ready(peer)
        await daemon.signal(signal.SIGTERM)
    finally:
        await daemon.stop()
        await peer.shutdown()
    found = modes(tmp_path / "state")
    assert len(found) > 1, found
    assert {p: oct(m) for p, m in found.items() if m & 0o077} == {}
    assert stat.S_IMODE(logfile.stat().st_mode) & 0o077 == 0
