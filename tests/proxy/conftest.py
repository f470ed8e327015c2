"""Fixtures of the proxy tests: signing keys and a proxy in this process."""

from __future__ import annotations

from tests.proxy.support import keys_fixture, proxy_fixture  # noqa: F401 (fixtures)


