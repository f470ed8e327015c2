"""KeySource: satellites fetch, cache and use the switchboard's capability keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import RunningSwitchboard
from treadmill.common.captoken import Access, CapabilityError, CapabilityKeyError
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
