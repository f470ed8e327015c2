"""An SSH manhole: a Python shell inside a running daemon, for operators.

The shell is a :class:`twisted.conch.manhole.ColoredManhole` whose namespace
holds the role's live service objects. Logins are by public key only, against
an OpenSSH ``authorized_keys`` file that is re-read at every login (any user
name is accepted; the key decides). The host key is generated on first start
(Ed25519, mode 0600) and reused afterwards, so clients can pin it.

Listeners must be loopback TCP or UNIX sockets; ``config.RoleOptions`` checks
this for ``manhole.listen``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from zope.interface import implementer

from treadmill.common.files import write_atomically

__all__ = ["AuthorizedKeysFile", "load_or_create_host_key", "manhole_factory", "manhole_service"]

log = Logger()


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """The keys of an OpenSSH ``authorized_keys`` file, for every user name.

    The file is read at each login so that edits apply without a restart; an
    unreadable file authorises nobody.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> list[keys.Key]:
        """Parse the file; raise ``OSError`` if it cannot be read."""
        with open(self.path, "rb") as f:
            return list(readAuthorizedKeyFile(f))

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterable[keys.Key]:
        try:
            return self.read()
        except OSError as e:
            log.error("cannot read manhole authorized keys {path}: {error}",
                      path=self.path, error=e.strerror)
            return []


def load_or_create_host_key(path: str) -> keys.Key:
    """Load the SSH host key at ``path``, generating an Ed25519 key first if absent."""
    if not os.path.exists(path):
        private = ed25519.Ed25519PrivateKey.generate()
        data = private.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.OpenSSH,
            encryption_algorithm=serialization.NoEncryption(),
        )
        write_atomically(path, data)
        log.info("generated manhole host key {path} ({fingerprint})",
                 path=path, fingerprint=keys.Key(private).fingerprint(
                     keys.FingerprintFormats.SHA256_BASE64))
    return keys.Key.fromFile(path)


class _TerminalSession(manhole_ssh.TerminalSession):
    """Conch's terminal session, with window resizes and EOF handled, not logged as errors."""

    _transport: manhole_ssh.TerminalSessionTransport | None = None

    def openShell(self, proto: Any) -> None:
        self._transport = self.transportFactory(
            proto, self.chainedProtocolFactory(), IConchUser(self.original),
            self.width, self.height)

    def windowChanged(self, newWindowSize: tuple[int, int, int, int]) -> None:
        self.height, self.width = newWindowSize[:2]
        if self._transport is not None:
            terminal = self._transport.chainedProtocol.terminalProtocol
            terminal.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        pass


class _ManholeProtocolFactory:
    """Builds the terminal protocol for one session."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace

    def __call__(self) -> insults.ServerProtocol:
        return insults.ServerProtocol(manhole.ColoredManhole, self.namespace)


def manhole_factory(
    authorized_keys: str, host_key: str, namespace: dict[str, Any]
) -> manhole_ssh.ConchFactory:
    """The SSH server factory of a manhole; fails early if a key file is unusable."""
    keydb = AuthorizedKeysFile(authorized_keys)
    keydb.read()
    key = load_or_create_host_key(host_key)

    realm = manhole_ssh.TerminalRealm()
    realm.sessionFactory = _TerminalSession
    realm.chainedProtocolFactory = _ManholeProtocolFactory(namespace)
    factory = manhole_ssh.ConchFactory(portal.Portal(realm, [SSHPublicKeyChecker(keydb)]))
    # ConchFactory's key maps are class attributes: never mutate those.
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    return factory


def manhole_service(
    reactor: IReactorCore,
    endpoints: list[str],
    authorized_keys: str,
    host_key: str,
    namespace: dict[str, Any],
) -> MultiService:
    """An SSH manhole listening on each endpoint description in ``endpoints``.

    ``namespace`` is shared by all sessions and is not copied: objects added
    to it later are visible too.
    """
    factory = manhole_factory(authorized_keys, host_key, namespace)
    service = MultiService()
    for desc in endpoints:
        StreamServerEndpointService(serverFromString(reactor, desc), factory).setServiceParent(
            service)
    return service
