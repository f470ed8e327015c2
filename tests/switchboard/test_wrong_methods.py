"""Every path the switchboard serves, the API's and the web console's alike, answers a
method it does not serve with 405 and an ``Allow`` header naming exactly the methods it
does serve (issue 12: "405 answers lack Allow"), before any authentication.

The table comes from the two Klein apps' URL maps, so a new route is checked without a
change here; the requests go over loopback as raw bytes to a real switchboard.
"""

from __future__ import annotations

import re
from typing import Any

import pytest_twisted

from tests.support import RunningSwitchboard
from tests.util.raw import raw_request
from treadmill.switchboard.api import SwitchboardAPI
from treadmill.switchboard.web import WebConsole

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PLACEHOLDER = re.compile(r"<(?:[A-Za-z_]\w*(?:\([^)]*\))?:)?[A-Za-z_]\w*>")


def _served(app: Any, path: str) -> set[str]:
    """What ``app`` serves at ``path`` (werkzeug's own answer), without OPTIONS."""
    return set(app.url_map.bind("switchboard").allowed_methods(path)) - {"OPTIONS"}


def wrong_methods() -> list[tuple[str, str, set[str]]]:
    """(method, path, allowed) for every routed path and each method it does not serve."""
    table: list[tuple[str, str, set[str]]] = []
    for app in (SwitchboardAPI.app, WebConsole.app):
        paths = sorted({PLACEHOLDER.sub("x", rule.rule) for rule in app.url_map.iter_rules()})
        for path in paths:
            if path != "/" and not path.startswith("/console/") and app is WebConsole.app:
                continue
            if (path == "/" or path.startswith("/console/")) and app is SwitchboardAPI.app:
                continue  # the console's paths go to the console (web.ConsoleRoot)
            allowed = _served(app, path)
            table += [(m, path, allowed) for m in METHODS if m not in allowed]
    return table


def test_the_table_reaches_the_new_routes() -> None:
    paths = {path for _, path, _ in wrong_methods()}
    for path in ("/api/v1/health-checks", "/api/v1/health-checks/x/x",
                 "/api/v1/hosts/x/health", "/console/session", "/console/privileges/x/x",
                 "/console/assets/x", "/", "/api/v1/images/x/history",
                 "/api/v1/images/x/rollback", "/api/v1/openapi.json"):
        assert path in paths, path


@pytest_twisted.ensureDeferred
async def test_every_path_answers_405_with_allow(module_switchboard: RunningSwitchboard
                                                 ) -> None:
    port = int(module_switchboard.url.rsplit(":", 1)[1])
    wrong = []
    for method, path, allowed in wrong_methods():
        status, raw = await raw_request(port, (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            "Content-Length: 0\r\n\r\n").encode())
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        found = re.search(r"^allow: *(.*)$", head, re.I | re.M)
        sent = {m.strip() for m in found.group(1).split(",")} if found else None
        if status != 405 or sent != allowed:
            wrong.append(f"{method} {path}: {status}, Allow {sent}, expected {allowed}")
    assert not wrong, "\n".join(wrong)
