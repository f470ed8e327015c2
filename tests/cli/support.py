"""Helpers of the ``tml`` tests: every leaf command of a parser (``commands``), a
switchboard with an image store for ``tml image`` (``store_env``, ``register``), a
``DIGEST``, a real ``tml`` process (``Tml``), console bytes of a job on its log server
(``append_console``)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol

from tests.util.waiting import eventually
from treadmill.common.captoken import Access

DIGEST = "sha256:" + "0123456789abcdef" * 4
"""An image digest for requests that need one."""

STORE = "http://store.example"
"""The image store ``store_env`` registers."""

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf command of the tree with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from commands(child, (*path, name))


async def store_env(switchboard: Any, tmp_path: Path) -> dict[str, str]:
    """``tml``'s environment as ``switchboard``'s admin, with :data:`STORE` registered."""
    env = switchboard.tml_env(tmp_path)
    await switchboard.register_store(STORE, "store")
    return env


async def register(tml: Callable[..., Awaitable[Any]], env: dict[str, str], name: str,
                   digest: str, *args: str) -> Any:
    """``tml image register NAME DIGEST --store STORE ARGS...``: its result."""
    return await tml("image", "register", name, digest, "--store", STORE, *args, env=env)


async def append_console(switchboard: Any, job: dict[str, Any], offset: int, data: bytes
                         ) -> None:
    """Append ``data`` at ``offset`` to ``job``'s console on its log server, as its host
    would (``switchboard``: a :class:`tests.support.RunningSwitchboard` signing for it)."""
    token = switchboard.service.signer.sign("host:h", "treadmill-logserver",
                                            [Access("job", job["id"], ("append",))], 60)
    r = await treq.post(f"{job['logs'][0]}/v1/jobs/{job['id']}/streams/console",
                        params={"offset": str(offset)}, data=data,
                        headers={"Authorization": f"Bearer {token}"})
    assert r.code == 200, await r.text()


class Tml(ProcessProtocol):
    """``python -m treadmill.cli.main ARGS`` with its output collected."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone, ProcessTerminated) else None
        self.ended.callback(code)

    @classmethod
    def start(cls, switchboard: Any, *argv: str,
              child_fds: dict[int, str | int] | None = None) -> Tml:
        """Start it as ``switchboard``'s admin; ``child_fds`` as ``spawnProcess`` takes
        them (default: standard input, output and error as pipes)."""
        proto = cls()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent",
               "TREADMILL_URL": switchboard.url, "TREADMILL_TOKEN": switchboard.admin_token,
               "PYTHONPATH": ROOT}
        args = [sys.executable, "-m", "treadmill.cli.main", *argv]
        proto.transport = reactor.spawnProcess(proto, sys.executable, args, env=env,
                                               childFDs=child_fds)
        return proto

    async def following(self) -> str:
        """Wait until it follows a job; return the job's id."""

        async def started() -> str | None:
            m = re.search(rb"tml: following job ([0-9a-f-]{36})", self.err)
            return m.group(1).decode() if m else None

        return await eventually(started, timeout=20)
