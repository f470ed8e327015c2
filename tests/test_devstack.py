"""``tools/devstack`` brings up a testbed where the printed commands work."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from tests.daemons import free_port, run_python
from treadmill.cli.main import run as tml

FAST = [f"mock.stages.{stage}=0" for stage in
        ("starting", "fetching_image", "allocating", "provisioning", "booting")]


@pytest_twisted.ensureDeferred
async def test_devstack_runs_a_first_job(tmp_path: Path) -> None:
    # The postgres user must reach the state directory; pytest's are private.
    root = Path(tempfile.mkdtemp(prefix="treadmill-devstack-"))
    root.chmod(0o755)
    state = root / "stack"
    port = str(free_port())
    try:
        for _ in range(2):  # Idempotent: a second run reuses everything.
            out, err, code = await run_python("-m", "treadmill.dev.devstack", "--detach",
                                              "--state", str(state), "--port", port)
            assert code == 0, out + err
        assert "tml job submit" in out
        env = {"TREADMILL_CONFIG": str(state / "tml.toml")}
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = ["job", "submit", "sha256:" + "0" * 64, "--tag", "mock", "--follow",
                "--param", "mock.run_time=0.1", "--param", "mock.exit_status=0"]
        for param in FAST:
            argv += ["--param", param]
        status = await tml(reactor, argv, stdout, stderr, env)
        assert status == 0, stdout.getvalue() + stderr.getvalue()
        assert "workload_exited, exit status 0" in stdout.getvalue() + stderr.getvalue()
        job_id = stdout.getvalue().splitlines()[0].strip()
        # Its events went to the devstack's log server.
        out, err = io.StringIO(), io.StringIO()
        status = await tml(reactor, ["job", "logs", job_id, "--stream", "events"], out, err,
                           env)
        assert status == 0 and '"state":"terminated"' in out.getvalue(), err.getvalue()
    finally:
        subprocess.run([sys.executable, "-m", "treadmill.dev.devstack", "stop", "--state",
                        str(state), "--port", port], capture_output=True, timeout=120,
                       env={**os.environ})
    try:
        for log in (state / "logs").glob("*.log"):
            assert "Traceback (most recent" not in log.read_text(), log
    finally:
        shutil.rmtree(root, ignore_errors=True)
