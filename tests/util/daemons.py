"""Real daemons for end-to-end tests: ``twistd -n <plugin>`` in a child process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

BIN = Path(sys.executable).parent


class _Output(ProcessProtocol):
    def __init__(self, log: io.BytesIO):
        self.log = log
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.log.write(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone, ProcessTerminated) else None
        self.ended.callback(code)


class Daemon:
    """One ``twistd --nodaemon`` process of a role."""

    def __init__(self, plugin: str, args: list[str], env: dict[str, str] | None = None,
                 twistd_args: list[str] | None = None):
        self.plugin = plugin
        self.args = args
        self.twistd_args = twistd_args or []
        self.env = {**os.environ, **(env or {})}
        self.log = io.BytesIO()
        self._proto: _Output | None = None
        self._transport: Any = None

    def start(self) -> None:
        self._proto = _Output(self.log)
        # twistd ignores --logfile when --logger names an observer.
        logfile = any(arg.startswith("--logfile") for arg in self.twistd_args)
        logger = [] if logfile else ["--logger=treadmill.common.logging.text"]
        argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", *logger, *self.twistd_args,
                self.plugin, *self.args]
        self._transport = reactor.spawnProcess(self._proto, argv[0], argv, env=self.env)

    @property
    def running(self) -> bool:
        return self._proto is not None and not self._proto.ended.called

    @property
    def output(self) -> str:
        return self.log.getvalue().decode("utf-8", "replace")

    async def wait_http(self, url: str, timeout: float = 30.0) -> None:
        """Wait until ``url`` answers 200, or fail with the daemon's output."""
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            if not self.running:
                raise AssertionError(f"{self.plugin} exited:\n{self.output}")
            try:
                response = await treq.get(url, timeout=2)
                await response.content()
                if response.code == 200:
                    return
            except Exception:
                pass
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"{self.plugin} not ready after {timeout} s:\n{self.output}")

    async def signal(self, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` and wait for the exit; return the exit code."""
        assert self._proto is not None
        if self.running:
            self._transport.signalProcess({signal.SIGTERM: "TERM", signal.SIGKILL: "KILL",
                                           signal.SIGINT: "INT"}[sig])
        return await self._proto.ended

    async def stop(self) -> None:
        if self.running:
            await self.signal(signal.SIGTERM)


async def run_python(*args: str) -> tuple[str, str, int]:
    """Run ``python ARGS`` without blocking the reactor."""
    out, err, code = await getProcessOutputAndValue(sys.executable, list(args), env=os.environ)
    return out.decode(), err.decode(), code


def run_twistd(plugin: str, *args: str) -> tuple[int, str]:
    """Run ``twistd --nodaemon PLUGIN ARGS`` to its end (a daemon that should refuse to
    start): its exit status and its output. Blocks: for tests outside the reactor."""
    proc = subprocess.run([str(BIN / "twistd"), "--nodaemon", "--pidfile=", plugin, *args],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def refused_config(plugin: str, config: Path, text: str) -> str:
    """Write ``text`` to ``config`` and run ``twistd PLUGIN --config CONFIG``, which must
    refuse it, naming the file; its output."""
    config.write_text(text)
    code, output = run_twistd(plugin, "--config", str(config))
    assert code != 0, output
    assert str(config) in output, output
    return output


async def bootstrap_admin(*flags: str) -> str:
    """The first admin, ``root``, made by ``python -m treadmill.switchboard.bootstrap
    FLAGS`` (``--config FILE`` or ``--database-dsn DSN``): its API token."""
    out, err, code = await run_python("-m", "treadmill.switchboard.bootstrap", *flags,
                                      "--admin", "root")
    assert code == 0, err
    return out.strip()
