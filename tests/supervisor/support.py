"""A :class:`JobRunner` on a :class:`Clock` with a recording connection (``Harness``,
``Connection``), for the tests of the runner's outbox, holds and SSH endpoints; and the
JUnit counts of a failed job's results as ``tml`` prints them (``failed_junit_counts``)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from tests.supervisor.peer import job
from tests.support import RunningSwitchboard
from treadmill.cli.main import run as tml
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.drivers.mock import MockDriver, MockSettings
from treadmill.supervisor.journal import StateFiles
from treadmill.supervisor.runner import JobRunner

TIMEOUT, CAP = 5.0, 40.0
ENDPOINTS = [{"service": "ssh", "proxy": "https://proxy.example", "host": "proxy.example",
              "port": 2222}]


class Connection:
    """What the runner sent on one connection, with the clock's time."""

    def __init__(self, clock: Clock, minor: int = protocol.MINOR):
        self.clock = clock
        self.minor = minor
        self.open = True
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self._rid = 0

    def send(self, message: dict[str, Any]) -> bool:
        if not self.open:
            return False
        protocol.validate(message)
        self.sent.append((self.clock.seconds(), message))
        return True

    def next_request_id(self) -> int:
        self._rid += 1
        return self._rid

    def events(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.sent if m["type"] == "job_event"]


class Harness:
    def __init__(self, tmp_path: Path, jitter: float = 0.0, **mock: Any):
        self.clock = Clock()
        self.state = tmp_path / "state"
        mock = {"durations": dict.fromkeys(STAGES, 1.0), "run_time": 1.0, **mock}
        settings = MockSettings(echo=False, **mock)
        self.runner = JobRunner(self.clock, MockDriver(self.clock, settings),
                                StateFiles(str(self.state), durable=False),
                                run_io=lambda fn, *a, **k: maybeDeferred(fn, *a, **k),
                                ack_timeout=TIMEOUT, resend_max=CAP, jitter=lambda: jitter)
        started = Deferred.fromCoroutine(self.runner.start())
        assert started.called
        self.conn = self.connect()

    def connect(self) -> Connection:
        conn = Connection(self.clock)
        self.runner.link_opened(conn)
        return conn

    def disconnect(self) -> None:
        self.conn.open = False
        self.runner.link_closed(self.conn)

    def start(self, **params: Any) -> None:
        self.runner.message_received(self.conn, protocol.start_job(900, job(**params)))
        self.clock.advance(0)  # the mock reports "starting" on the next turn

    def ack(self, rid: int, error: tuple[str, str] | None = None,
            conn: Connection | None = None) -> None:
        self.runner.message_received(conn or self.conn, protocol.ack(rid, error))

    def journal(self) -> list[str]:
        return sorted(os.listdir(self.state / "journal"))

    def advance_to(self, when: float) -> None:
        while self.clock.seconds() < when - 1e-9:
            self.clock.advance(min(0.25, when - self.clock.seconds()))


async def failed_junit_counts(sb: RunningSwitchboard, job_id: str
                              ) -> tuple[str | None, str | None, str | None]:
    """``tml job results --junit`` of a job whose tests failed (it exits 4): the suite's
    ``tests``, ``failures`` and ``skipped`` counts."""
    out, err = io.StringIO(), io.StringIO()
    code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "results",
                               job_id, "--junit"], out, err, {})
    assert code == 4, err.getvalue()
    suite = ElementTree.fromstring(out.getvalue().encode()).find("testsuite")
    assert suite is not None
    return suite.get("tests"), suite.get("failures"), suite.get("skipped")

