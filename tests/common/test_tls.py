"""Client TLS trust against a real TLS listener on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
import treq
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tests.util.certs import make_pki
from treadmill.common.tls import client_options, client_policy, load_certificates


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        return b"hello over tls"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, dict[str, Path]]:
    return {"good": make_pki(tmp_path, "good"), "other": make_pki(tmp_path, "other")}


@pytest.fixture
def tls_port(pki):
    paths = pki["good"]
    endpoint = serverFromString(
        reactor,
        f"ssl:0:interface=127.0.0.1:privateKey={paths['key']}:certKey={paths['cert']}")
    port = pytest_twisted.blockon(endpoint.listen(Site(_Hello())))
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.inlineCallbacks
def test_policy_trusts_ca_file(pki, tls_port):
    agent = Agent(reactor, contextFactory=client_policy(str(pki["good"]["ca"])))
    response = yield treq.get(f"https://localhost:{tls_port}/", agent=agent)
    assert response.code == 200
    assert (yield response.content()) == b"hello over tls"


@pytest_twisted.inlineCallbacks
def test_policy_rejects_other_ca(pki, tls_port):
    agent = Agent(reactor, contextFactory=client_policy(str(pki["other"]["ca"])))
    with pytest.raises(ResponseNeverReceived):
        yield treq.get(f"https://localhost:{tls_port}/", agent=agent)


@pytest_twisted.inlineCallbacks
def test_policy_platform_trust_rejects_private_ca(tls_port):
    agent = Agent(reactor, contextFactory=client_policy(None))
    with pytest.raises(ResponseNeverReceived):
        yield treq.get(f"https://localhost:{tls_port}/", agent=agent)


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    def __init__(self) -> None:
        self.done: defer.Deferred[str] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.transport.loseConnection()
        self.done.callback("ok")

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.errback(reason)


def _handshake(hostname: str, ca: Path, port: int) -> defer.Deferred[str]:
    protocol = _Handshake()
    endpoint = wrapClientTLS(client_options(hostname, str(ca)),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    endpoint.connect(Factory.forProtocol(lambda: protocol))
    return protocol.done


@pytest_twisted.inlineCallbacks
def test_options_verify_hostname_and_ip(pki, tls_port):
    assert (yield _handshake("localhost", pki["good"]["ca"], tls_port)) == "ok"
    assert (yield _handshake("127.0.0.1", pki["good"]["ca"], tls_port)) == "ok"


@pytest_twisted.inlineCallbacks
def test_options_reject_wrong_hostname(pki, tls_port):
    with pytest.raises(VerificationError):
        yield _handshake("wrong.example", pki["good"]["ca"], tls_port)


@pytest_twisted.inlineCallbacks
def test_options_reject_other_ca(pki, tls_port):
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        yield _handshake("localhost", pki["other"]["ca"], tls_port)


def test_load_certificates_bundle(pki, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki["good"]["ca"].read_bytes() + pki["other"]["ca"].read_bytes())
    assert len(load_certificates(str(bundle))) == 2


def test_load_certificates_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"empty\.pem"):
        load_certificates(str(empty))
