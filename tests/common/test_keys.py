"""KeySource: satellites fetch, cache and use the switchboard's capability keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.task import Clock

from tests.support import RunningSwitchboard
from treadmill.common.captoken import (
    Access,
    CapabilityError,
    CapabilityKeyError,
    CapabilitySigner,
)
from treadmill.common.keys import KeySource


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
