"""A switchboard's capability signing key, for the tests of the roles that verify tokens."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.task import Clock

from treadmill.common.captoken import Access, CapabilitySigner

ISSUER = "treadmill"


class SigningKey:
    """A new Ed25519 signing key; its public half in ``keys_file`` (JWKS), the file a
    satellite's ``auth.keys_file`` names."""

    def __init__(self, directory: Path, issuer: str = ISSUER):
        self.private = Ed25519PrivateKey.generate()
        self.issuer = issuer
        self.signer = CapabilitySigner(self.private, issuer, reactor)
        self.keys_file = directory / "capability-keys.json"
        self.keys_file.write_text(json.dumps(self.signer.jwks()))

    def sign(self, subject: str, audience: str, access: list[Access], ttl: float,
             issued_at: float | None = None, issuer: str | None = None) -> str:
        """A token; with ``issued_at``, signed as if the time were then (expired ones);
        with ``issuer``, issued by another name than the key's."""
        signer = self.signer
        if issued_at is not None or issuer is not None:
            clock = Clock()
            clock.advance(reactor.seconds() if issued_at is None else issued_at)
            signer = CapabilitySigner(self.private, issuer or self.issuer, clock)
        return signer.sign(subject, audience, access, ttl)
