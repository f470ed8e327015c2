"""Messages for people never show exception or ``Failure`` reprs."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import error as ierror
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import ResponseFailed

from treadmill.cli.client import plain_error

JOB = "5b7c0c9e-8a41-4f7e-b1b4-3c2d9e0f1a22"


class Odd(Exception):
    def __str__(self) -> str:
        return "<tests.Odd object at 0x7f00deadbeef>"


@pytest.mark.parametrize(("exc", "text"), [
    (ResponseNeverReceived([Failure(ierror.ConnectionDone())]),
     "the connection was closed unexpectedly"),
    (ResponseFailed([Failure(ierror.ConnectionLost())]), "the connection was closed unexpectedly"),
    (ResponseFailed([Failure(ierror.ConnectionRefusedError())]), "connection refused"),
    (ierror.ConnectionRefusedError(), "connection refused"),
    (ResponseFailed([Failure(ResponseFailed([Failure(Odd())]))]), "Odd"),
    (ResponseFailed([Failure(Odd())]), "Odd"),
    (FileNotFoundError(2, "No such file or directory", "/nope/ca.pem"),
     "No such file or directory: /nope/ca.pem"),
    (OSError("HTTP 502: bad gateway"), "HTTP 502: bad gateway"),
    (ValueError(), "ValueError"),
])
def test_plain_error(exc: BaseException, text: str) -> None:
    assert plain_error(exc) == text


class _HalfAnswer(Protocol):
    """Starts a chunked 200 answer and closes the connection before its end."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_log_server_dropping_mid_stream_is_described_plainly(tml, fake_switchboard,
                                                                     tmp_path,
                                                                     monkeypatch) -> None:
    from treadmill.cli.commands import logs

    monkeypatch.setattr(logs, "GIVE_UP_AFTER", 0.3)
    monkeypatch.setattr(logs, "RETRY_INITIAL", 0.05)
    port = reactor.listenTCP(0, Factory.forProtocol(_HalfAnswer), interface="127.0.0.1")
    try:
        fake_switchboard.log_servers = [f"http://127.0.0.1:{port.getHost().port}"]
        env = {"HOME": str(tmp_path), "TREADMILL_URL": fake_switchboard.url,
               "TREADMILL_TOKEN": "tmt_alice_secret"}
        r = await tml("job", "logs", JOB, env=env)
    finally:
        await maybeDeferred(port.stopListening)
    assert (r.status, r.out) == (1, "")
    assert "the connection was closed unexpectedly" in r.err
    for bad in ("<twisted", "Failure", "[<", "object at"):
        assert bad not in r.err, r.err


BAD = "na\udcffme"  # the bytes b"na\xffme" of a shell, as Python keeps them in argv and environ


@pytest.mark.parametrize(("argv", "env", "status", "said"), [
    (("image", "show", BAD), {}, 2, f"tml: error: an argument: {BAD!r} is not valid UTF-8\n"),
    (("job", "ls", "--owner", BAD), {}, 2,
     f"tml: error: an argument: {BAD!r} is not valid UTF-8\n"),
    (("--url", "http://127.0.0.1:9/" + BAD, "whoami"), {}, 1,
     "tml: error: --url: not valid UTF-8\n"),
    (("whoami",), {"TREADMILL_TOKEN": "tmt_" + BAD}, 1,
     "tml: error: TREADMILL_TOKEN: not valid UTF-8\n"),
])
@pytest_twisted.ensureDeferred
async def test_text_that_is_not_utf8_is_refused_before_it_is_sent(
        tml, fake_switchboard, tmp_path, argv, env, status, said) -> None:
    """Non-UTF-8 bytes in an argument or a setting that goes on the wire: a usage or
    settings error naming it, not a UnicodeEncodeError traceback ('internal error')."""
    env = {"HOME": str(tmp_path), "TREADMILL_URL": fake_switchboard.url,
           "TREADMILL_TOKEN": "tmt_alice_secret", **env}
    r = await tml(*argv, env=env)
    assert (r.status, r.err) == (status, said)


@pytest_twisted.ensureDeferred
async def test_a_config_file_that_is_not_utf8_is_named(tml, tmp_path) -> None:
    path = tmp_path / "tml.toml"
    path.write_bytes(b'url = "http://127.0.0.1:9"\ntoken = "\xff"\n')
    r = await tml("--config", str(path), "whoami", env={"HOME": str(tmp_path)})
    assert (r.status, r.err) == (1, f"tml: error: {path}: not UTF-8 text\n")
