"""Client TLS trust against a real TLS listener on loopback."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
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

from treadmill.common.tls import client_options, client_policy, load_certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


def make_pki(directory: Path, name: str) -> dict[str, Path]:
    """A CA and a server certificate for localhost and 127.0.0.1, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = _key()
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": directory / f"{name}-ca.pem",
        "key": directory / f"{name}-key.pem",
        "cert": directory / f"{name}-cert.pem",
    }
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["key"], server_key)
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


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
