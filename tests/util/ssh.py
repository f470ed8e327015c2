"""SSH for manhole tests: client keys, a small conch client, OpenSSH exec requests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import channel, connection, keys, session, transport, userauth
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue

SSH = shutil.which("ssh")
"""The OpenSSH client, or None (skip the tests that need it)."""


def make_client_key(path: Path) -> keys.Key:
    """An Ed25519 key in OpenSSH format, as ``ssh-keygen`` would write it."""
    private = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)
    return keys.Key(private)


def new_ssh_public_key() -> str:
    """A fresh OpenSSH Ed25519 public key line (for the SSH key API)."""
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


async def ssh_exec(port: int, key: Path, command: str) -> tuple[str, int]:
    """Run ``command`` in the manhole on ``port`` as an OpenSSH exec request (no pty):
    its output and exit status."""
    assert SSH is not None
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    out, err, code = await getProcessOutputAndValue(SSH, [
        "-T", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(key),
        "-p", str(port), "operator@127.0.0.1", command], env=env)
    return (out + err).decode(), code


# A minimal conch client: public-key login, a pty, a shell, some typing.


class _Session(channel.SSHChannel):
    name = b"session"

    def __init__(self, typed: bytes, result: dict, until: bytes | None = None, **kw) -> None:
        super().__init__(**kw)
        self.typed = typed
        self.result = result
        self.until = until

    @defer.inlineCallbacks
    def channelOpen(self, specificData: bytes):
        pty = session.packRequest_pty_req(b"xterm", (24, 80, 0, 0), b"")
        yield self.conn.sendRequest(self, b"pty-req", pty, wantReply=True)
        yield self.conn.sendRequest(self, b"shell", b"", wantReply=True)
        self.result["shell"] = True
        try:
            resize = session.packRequest_window_change((40, 120, 0, 0))
            yield self.conn.sendRequest(self, b"window-change", resize, wantReply=True)
            self.result["resized"] = True
        except Exception:
            self.result["resized"] = False
        self.write(self.typed)

    def dataReceived(self, data: bytes) -> None:
        self.result["output"] += data
        if self.until is not None and self.until in self.result["output"]:
            self.until = None
            self.write(b"\x04")  # Ctrl-D once what we waited for is shown

    def closed(self) -> None:
        # The manhole closes the channel on Ctrl-D; end the connection too.
        self.conn.transport.loseConnection()


class _Connection(connection.SSHConnection):
    def __init__(self, typed: bytes, result: dict, until: bytes | None = None) -> None:
        super().__init__()
        self.typed = typed
        self.result = result
        self.until = until

    def serviceStarted(self) -> None:
        self.result["authenticated"] = True
        self.openChannel(_Session(self.typed, self.result, self.until, conn=self))


class _UserAuth(userauth.SSHUserAuthClient):
    def __init__(self, key: keys.Key, instance: connection.SSHConnection) -> None:
        super().__init__(b"admin", instance)
        self.keys = [key]

    def getPublicKey(self):
        return self.keys[0].public() if self.keys else None

    def getPrivateKey(self):
        return defer.succeed(self.keys.pop())

    def getPassword(self, prompt=None):
        return None


class _Client(transport.SSHClientTransport):
    def __init__(self, key: keys.Key, typed: bytes, until: bytes | None = None) -> None:
        self.key = key
        self.result = {"output": b"", "authenticated": False, "shell": False, "host_key": None}
        self.typed = typed
        self.until = until
        self.done: defer.Deferred[dict] = defer.Deferred()

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes):
        self.result["host_key"] = keys.Key.fromString(hostKey)
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(_UserAuth(self.key, _Connection(self.typed, self.result, self.until)))

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if not self.done.called:
            self.done.callback(self.result)


def conch_session(port: int, key_path: Path, typed: bytes, timeout: float = 10,
                  until: bytes | None = None) -> defer.Deferred:
    """Log in with the key at ``key_path``, type ``typed`` (then Ctrl-D once ``until``
    is shown, if given); the session's result."""
    client = _Client(keys.Key.fromFile(str(key_path)), typed, until)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    d = endpoint.connect(protocol.Factory.forProtocol(lambda: client))
    d.addCallback(lambda _: client.done)

    def on_timeout(result, timeout):
        if client.transport is not None:
            client.transport.abortConnection()
        raise defer.TimeoutError(f"SSH session still open after {timeout}s: {client.result}")

    return d.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)
