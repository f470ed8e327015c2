"""KeySource: satellites fetch, cache and use the switchboard's capability keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support import RunningSwitchboard
from treadmill.common.captoken import (
    Access,
    CapabilityError,
    CapabilityKeyError,
    CapabilitySigner,
)
from treadmill.common.keys import KeySource, keys_url


@pytest_twisted.ensureDeferred
async def test_fetch_cache_and_verify(switchboard: RunningSwitchboard, tmp_path: Path) -> None:
    cache = tmp_path / "keys.json"
    source = KeySource(reactor, url=f"{switchboard.url}/.well-known/treadmill/capability-keys",
                       file=str(cache), refresh=60)
    source.startService()
    try:
        await source.ready()
    finally:
        await source.stopService()
    signer = switchboard.service.signer
    token = signer.sign("alice", "store-1", [Access("repository", "alice/x", ("pull",))], 60)
    verifier = source.verifier("treadmill", "store-1")
    assert verifier.verify(token, "repository", "alice/x", "pull").subject == "alice"
    with pytest.raises(CapabilityError):
        verifier.verify(token, "repository", "alice/x", "push")
    with pytest.raises(CapabilityError):
        source.verifier("treadmill", "store-2").verify_any(token)
    # A restart while the switchboard is away uses the cached keys.
    offline = KeySource(reactor, url="http://127.0.0.1:9/unreachable", file=str(cache))
    assert offline.verifier("treadmill", "store-1").verify_any(token).subject == "alice"


@pytest_twisted.ensureDeferred
async def test_unreachable_url_keeps_waiting(tmp_path: Path) -> None:
    source = KeySource(reactor, url="http://127.0.0.1:9/keys", file=str(tmp_path / "k.json"))
    await source.fetch()
    assert source.keys == {} and not source.ready().called


def test_a_source_is_required() -> None:
    with pytest.raises(CapabilityKeyError):
        KeySource(reactor)


def test_verified_claims_are_cached_until_expiry_or_a_key_change(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    signer = CapabilitySigner(Ed25519PrivateKey.generate(), "treadmill", clock)
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(signer.jwks()))
    source = KeySource(clock, file=str(keys_file))
    verifier = source.verifier("treadmill", "logs")
    token = signer.sign("host-1", "logs", [Access("job", "j1", ("write",))], 60)
    first = verifier.verify(token, "job", "j1", "write")
    assert verifier.verify(token, "job", "j1", "write") is first  # from the cache
    with pytest.raises(CapabilityError) as e:  # the scope is still checked every time
        verifier.verify(token, "job", "j2", "write")
    assert e.value.reason == "insufficient_scope"
    clock.advance(70)  # past expiry and leeway
    with pytest.raises(CapabilityError) as e:
        verifier.verify_any(token)
    assert e.value.reason == "expired"
    fresh = signer.sign("host-1", "logs", [Access("job", "j1", ("write",))], 60)
    assert verifier.verify_any(fresh).subject == "host-1"
    source.keys = {}  # the key was withdrawn: cached claims go with it
    with pytest.raises(CapabilityError) as e:
        verifier.verify_any(fresh)
    assert e.value.reason == "unknown_key"


# -- the key set's origin and changes (security issue 12) ---------------------------------


@pytest.mark.parametrize("url", [
    "https://switchboard.example/.well-known/treadmill/capability-keys",
    "https://10.0.0.1:8443/keys",
    "http://127.0.0.1:8080/.well-known/treadmill/capability-keys",
    "http://127.1.2.3/keys",
    "http://[::1]:8080/keys",
    "http://localhost:8080/keys",
])
def test_keys_url_accepted(url: str) -> None:
    assert keys_url(url) == url
    KeySource(reactor, url=url)


@pytest.mark.parametrize("url", [
    "http://switchboard.example/.well-known/treadmill/capability-keys",
    "http://10.0.0.1/keys",
    "http://[2001:db8::1]/keys",
    "http://127.0.0.1.evil.example/keys",
    "http://localhost.evil.example/keys",
    "ftp://127.0.0.1/keys",
    "file:///etc/treadmill/keys.json",
    "https:///no-host",
    "http://[::1/keys",
])
def test_keys_url_refused(url: str) -> None:
    with pytest.raises(ValueError):
        keys_url(url)
    with pytest.raises(CapabilityKeyError):
        KeySource(reactor, url=url)


def test_a_role_refuses_a_plain_http_keys_url() -> None:
    from treadmill.common.config import ConfigError
    from treadmill.logserver.tap import Options

    with pytest.raises(ConfigError) as info:
        Options().parseOptions(["--root", "/tmp/x", "--auth-keys-url",
                                "http://switchboard.example/keys"])
    assert info.value.key == "--auth-keys-url" and "https" in info.value.problem


class _Keys(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.jwks: dict = {"keys": []}

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.jwks).encode()


@pytest_twisted.ensureDeferred
async def test_key_changes_are_logged(tmp_path: Path) -> None:
    first, second = (CapabilitySigner(Ed25519PrivateKey.generate(), "treadmill", reactor)
                     for _ in range(2))
    served = _Keys()
    port = reactor.listenTCP(0, Site(served), interface="127.0.0.1")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        source = KeySource(reactor, url=f"http://127.0.0.1:{port.getHost().port}/keys",
                           file=str(tmp_path / "keys.json"))
        said = lambda: [(e["log_level"], formatEvent(e)) for e in events  # noqa: E731
                        if e.get("log_namespace", "").endswith("KeySource")]
        served.jwks = first.jwks()
        await source.fetch()
        assert said() == [(LogLevel.info, f"Capability keys from {source.url}: "
                                          f"{first.key_id}")]
        events.clear()
        served.jwks = {"keys": first.jwks()["keys"] + second.jwks()["keys"]}
        await source.fetch()
        assert said() == [(LogLevel.info, f"Capability keys added from {source.url}: "
                                          f"{second.key_id}")]
        events.clear()
        served.jwks = second.jwks()
        await source.fetch()
        assert said() == [(LogLevel.warn, f"Capability keys removed from {source.url}: "
                                          f"{first.key_id}")]
        events.clear()
        await source.fetch()
        assert said() == []
        mode = (tmp_path / "keys.json").stat().st_mode & 0o777
        assert mode & 0o037 == 0, oct(mode)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
