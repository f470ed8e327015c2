"""The site's root hands a supervisor's upgrade straight to the links' resource (no Klein
routing, about 5 % of a surviving instance's CPU in a failover); the rest goes on as before."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.web.test.requesthelper import DummyRequest

from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.web import ConsoleRoot


class Named:
    """A resource that answers its name."""

    def __init__(self, name: bytes):
        self.name = name

    def render(self, request: Any) -> bytes:
        return self.name


def rendered(root: ConsoleRoot, method: bytes, path: str) -> bytes:
    request = DummyRequest(path.strip("/").split("/"))
    request.method = method
    request.path = path.encode()
    return root.render(request)


@pytest.mark.parametrize("method, path, expected", [
    (b"GET", protocol.PATH, b"supervisor"),
    (b"POST", protocol.PATH, b"api"),            # the API answers 405
    (b"HEAD", protocol.PATH, b"api"),
    (b"GET", protocol.PATH + "/", b"api"),
    (b"GET", "/api/v1/jobs", b"api"),
    (b"GET", "/", b"console"),
    (b"GET", "/console/jobs", b"console"),
])
def test_the_root_routes_upgrades_to_the_links(method: bytes, path: str, expected: bytes
                                                ) -> None:
    root = ConsoleRoot(Named(b"console"), Named(b"api"), Named(b"supervisor"))
    assert rendered(root, method, path) == expected


def test_without_links_the_api_answers_the_upgrade() -> None:
    root = ConsoleRoot(Named(b"console"), Named(b"api"))
    assert rendered(root, b"GET", protocol.PATH) == b"api"  # its route: 503, not served here
