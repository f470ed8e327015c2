"""Client-side TLS: which certificate authorities a client trusts.

Listeners need nothing here: they serve TLS through endpoint strings such as
``ssl:8443:privateKey=/etc/treadmill/key.pem:certKey=/etc/treadmill/cert.pem``
(see ``docs/operations.md``).

Clients take an optional CA file. Without one they trust the platform's
certificate store; with one they trust exactly the certificates in that PEM
file. Either way the server's hostname (or IP address) is checked against its
certificate with service-identity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = ["client_options", "client_policy", "load_certificates", "trust_root"]


def load_certificates(ca_file: str) -> list[ssl.Certificate]:
    """Every certificate in a PEM file; ``ValueError`` if it holds none."""
    with open(ca_file, "rb") as f:
        data = f.read()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"{ca_file}: no PEM certificate could be read: {e}") from None
    return [ssl.Certificate.loadPEM(cert.public_bytes(Encoding.PEM)) for cert in certs]


def trust_root(ca_file: str | None) -> IOpenSSLTrustRoot:
    """The platform trust store, or exactly the certificates in ``ca_file``."""
    if ca_file is None:
        return ssl.platformTrust()
    return ssl.trustRootFromCertificates(load_certificates(ca_file))


def client_policy(ca_file: str | None) -> IPolicyForHTTPS:
    """A TLS policy for ``treq``/``Agent`` that verifies hostnames against ``ca_file``."""
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file))


def client_options(hostname: str, ca_file: str | None) -> IOpenSSLClientConnectionCreator:
    """TLS options for a raw TCP or WebSocket client connecting to ``hostname``.

    Use with ``wrapClientTLS`` or a ``tls:`` client endpoint.
    """
    return ssl.optionsForClientTLS(hostname, trustRoot=trust_root(ca_file))
