"""The SSH manhole, end to end over loopback with a real SSH client."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from twisted.conch.ssh import keys
from twisted.internet import defer, error, protocol, reactor

from tests.util.ssh import SSH, conch_session, make_client_key
from treadmill.common.manhole import load_or_create_host_key, manhole_service


class Thing:
    value = 20260


async def later(x, delay: float = 0.05):
    """Doubles ``x`` after ``delay`` seconds of reactor time (a real wait)."""
    from twisted.internet.task import deferLater

    await deferLater(reactor, delay, lambda: None)
    return x * 2


@dataclass
class Setup:
    dir: Path
    key: Path
    stranger: Path
    authorized_keys: Path
    host_key: Path
    namespace: dict = field(default_factory=lambda: {"thing": Thing(), "later": later})


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    s = Setup(
        dir=tmp_path,
        key=tmp_path / "id_operator",
        stranger=tmp_path / "id_stranger",
        authorized_keys=tmp_path / "authorized_keys",
        host_key=tmp_path / "host_key",
    )
    operator = make_client_key(s.key)
    make_client_key(s.stranger)
    s.authorized_keys.write_bytes(
        b"# operators\n" + operator.public().toString("openssh") + b" operator@test\n")
    return s


@pytest.fixture
def manhole(setup: Setup):
    """A running manhole; yields its TCP port."""
    service = manhole_service(reactor, ["tcp:0:interface=127.0.0.1"],
                              str(setup.authorized_keys), str(setup.host_key), setup.namespace)
    service.startService()
    (child,) = list(service)
    port = pytest_twisted.blockon(child._waitingForPort)
    yield port.getHost().port
    pytest_twisted.blockon(service.stopService())


# Ctrl-D on an empty line ends the manhole session.
TYPED = b"print(thing.value * 3)\r\x04"


@pytest_twisted.inlineCallbacks
def test_conch_client_sees_namespace(setup: Setup, manhole: int):
    result = yield conch_session(manhole, setup.key, TYPED)
    assert result["authenticated"] and result["shell"] and result["resized"]
    assert b"60780" in result["output"]


@pytest_twisted.inlineCallbacks
def test_unknown_key_is_refused(setup: Setup, manhole: int):
    result = yield conch_session(manhole, setup.stranger, TYPED)
    assert not result["authenticated"]
    assert b"60780" not in result["output"]


@pytest_twisted.inlineCallbacks
def test_authorized_keys_reread_at_login(setup: Setup, manhole: int):
    stranger = keys.Key.fromFile(str(setup.stranger))
    with setup.authorized_keys.open("ab") as f:
        f.write(stranger.public().toString("openssh") + b"\n")
    result = yield conch_session(manhole, setup.stranger, TYPED)
    assert result["authenticated"]
    assert b"60780" in result["output"]


@pytest_twisted.inlineCallbacks
def test_host_key_persisted(setup: Setup, manhole: int):
    assert stat.S_IMODE(os.stat(setup.host_key).st_mode) == 0o600
    stored = load_or_create_host_key(str(setup.host_key))
    first = yield conch_session(manhole, setup.key, TYPED)
    assert first["host_key"] == stored.public()

    again = manhole_service(reactor, ["tcp:0:interface=127.0.0.1"],
                            str(setup.authorized_keys), str(setup.host_key), setup.namespace)
    again.startService()
    try:
        (child,) = list(again)
        port = (yield child._waitingForPort).getHost().port
        second = yield conch_session(port, setup.key, TYPED)
    finally:
        yield again.stopService()
    fingerprint = keys.FingerprintFormats.SHA256_BASE64
    assert second["host_key"].fingerprint(fingerprint) == stored.fingerprint(fingerprint)
    assert not [p for p in setup.dir.iterdir() if p.name.startswith(".host_key.")]


def test_missing_authorized_keys_fails_early(setup: Setup) -> None:
    with pytest.raises(FileNotFoundError):
        manhole_service(reactor, ["tcp:0:interface=127.0.0.1"], str(setup.dir / "nope"),
                        str(setup.host_key), {})
    assert not setup.host_key.exists()


class _SSHProcess(protocol.ProcessProtocol):
    def __init__(self, typed: bytes, close_stdin: bool = False) -> None:
        self.typed = typed
        self.close_stdin = close_stdin
        self.output = b""
        self.done: defer.Deferred[tuple[bytes, int | None]] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.typed)
        if self.close_stdin:
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        code = reason.value.exitCode if reason.check(error.ProcessTerminated) else 0
        self.done.callback((self.output, code))


def openssh_session(port: int, key_path: Path, typed: bytes, *, tty: bool = True,
                    command: str | None = None) -> defer.Deferred:
    """Run OpenSSH's ``ssh`` with a pty (``-tt``) or without (``-T``: standard input
    is a pipe, closed after ``typed``), and an exec request if ``command`` is given;
    fires with (output, exit status)."""
    proto = _SSHProcess(typed, close_stdin=not tty)
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    args = [SSH, "-tt" if tty else "-T", "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR",
            "-i", str(key_path), "-p", str(port), "admin@127.0.0.1"]
    if command is not None:
        args.append(command)
    process = reactor.spawnProcess(proto, SSH, args, env=env)
    timeout = reactor.callLater(20, process.signalProcess, "KILL")
    return proto.done.addBoth(lambda r: (timeout.active() and timeout.cancel(), r)[1])


@pytest.mark.skipif(SSH is None, reason="no OpenSSH client installed")
@pytest_twisted.inlineCallbacks
def test_openssh_client(setup: Setup, manhole: int):
    output, code = yield openssh_session(manhole, setup.key, TYPED)
    assert b"60780" in output, output
    output, code = yield openssh_session(manhole, setup.stranger, TYPED)
    assert code == 255
    assert b"60780" not in output
    assert b"Permission denied" in output


# Top-level await, and sessions without a terminal.


@pytest_twisted.inlineCallbacks
def test_await_in_terminal(setup: Setup, manhole: int):
    typed = b"await later(21)\rlater(8)\rr = await later(thing.value)\rprint(r + 1)\r"
    result = yield conch_session(manhole, setup.key, typed, until=b"40521")
    output = result["output"]
    # 42 from the awaited expression, 16 from the coroutine awaited for us.
    assert b"42" in output and b"16" in output and b"40521" in output, output
    assert b"SyntaxError" not in output and b"<coroutine" not in output


@pytest_twisted.inlineCallbacks
def test_ctrl_c_cancels_a_wait(setup: Setup, manhole: int):
    typed = b"await later(1, 30)\r\x03print(7000 + 777)\r"
    result = yield conch_session(manhole, setup.key, typed, until=b"7777")
    assert b"CancelledError" in result["output"]


@pytest_twisted.inlineCallbacks
def test_leaving_while_waiting_lets_the_work_finish(setup: Setup, manhole: int):
    done = []

    async def slow():
        from twisted.internet.task import deferLater

        await deferLater(reactor, 0.3, lambda: None)
        done.append(True)
        return "finished"

    setup.namespace["slow"] = slow
    errors = []
    from twisted.logger import globalLogPublisher

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        # Ctrl-D right after the line: the session ends before the result is there.
        result = yield conch_session(manhole, setup.key, b"await slow()\r\x04")
        assert b"finished" not in result["output"]
        from twisted.internet.task import deferLater

        yield deferLater(reactor, 0.5, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert done == [True] and errors == []


@pytest.mark.skipif(SSH is None, reason="no OpenSSH client installed")
@pytest_twisted.inlineCallbacks
def test_exec_request_runs_lines_in_order(setup: Setup, manhole: int):
    # Each line waits for the one before: x exists only once later() has fired.
    command = "x = await later(5, 0.2)\nprint(x + 1)\nthing.value\nlater(x)\nNone"
    output, code = yield openssh_session(manhole, setup.key, b"", tty=False, command=command)
    assert (output, code) == (b"11\n20260\n20\n", 0)
    output, code = yield openssh_session(manhole, setup.key, b"", tty=False,
                                         command="help_manhole()")
    assert code == 0
    lines = [line.split() for line in output.decode().splitlines()]
    assert ["later()", "[await]", "Doubles", "``x``", "after", "``delay``", "seconds", "of",
            "reactor", "time", "(a", "real", "wait)."] in lines, output
    assert ["thing", "tests.common.test_manhole.Thing"] in lines


@pytest.mark.skipif(SSH is None, reason="no OpenSSH client installed")
@pytest_twisted.inlineCallbacks
def test_exec_request_errors_set_the_exit_status(setup: Setup, manhole: int):
    command = "1/0\nprint('after')\nawait later(None)"
    output, code = yield openssh_session(manhole, setup.key, b"", tty=False, command=command)
    assert code == 1
    assert b"ZeroDivisionError: division by zero" in output
    assert b"after\n" in output and b"TypeError" in output
    assert b"treadmill/common/manhole.py" not in output  # the shell's own frames are hidden
    output, code = yield openssh_session(manhole, setup.key, b"", tty=False,
                                         command="raise SystemExit(3)\nprint('alive')")
    assert code == 1 and b"alive" in output


@pytest.mark.skipif(SSH is None, reason="no OpenSSH client installed")
@pytest_twisted.inlineCallbacks
def test_piped_standard_input(setup: Setup, manhole: int):
    # An unfinished block at the end of the input is run, as python does.
    typed = b"x = await later(5, 0.2)\nprint(x)\nfor i in range(2):\n    print(i * x)\n"
    output, code = yield openssh_session(manhole, setup.key, typed, tty=False)
    assert (output, code) == (b"10\n0\n10\n", 0)


@pytest.mark.skipif(SSH is None, reason="no OpenSSH client installed")
@pytest_twisted.inlineCallbacks
def test_unknown_key_cannot_exec(setup: Setup, manhole: int):
    output, code = yield openssh_session(manhole, setup.stranger, b"", tty=False,
                                         command="print(thing.value * 3)")
    assert code == 255 and b"60780" not in output and b"Permission denied" in output


# The interpreter alone, with a plain output collector.


class _Output:
    def __init__(self) -> None:
        self.text: list[str] = []

    def addOutput(self, data, isAsync=None) -> None:
        self.text.append(data)


def test_a_deferred_shown_keeps_its_result_for_its_owner() -> None:
    from treadmill.common.manhole import AsyncManholeInterpreter

    owned: defer.Deferred[int] = defer.Deferred()
    seen: list[int] = []
    out = _Output()
    shell = AsyncManholeInterpreter(out, {"owned": owned})
    shell.push(b"owned")
    assert shell.pending() is not None
    owned.addCallback(seen.append)  # the daemon's own consumer, added later
    owned.callback(7)
    assert "7" in out.text and seen == [7] and shell.pending() is None


def test_syntax_errors_and_exceptions_are_counted_not_raised() -> None:
    from treadmill.common.manhole import AsyncManholeInterpreter

    out = _Output()
    shell = AsyncManholeInterpreter(out, {})
    for line in (b"1 +", b"", b"raise SystemExit(0)", b"import sys; sys.exit(2)", b"40 + 2"):
        shell.push(line)
    assert shell.errors == 3 and out.text[-1] == "42"
    assert any("SystemExit" in t for t in out.text)
