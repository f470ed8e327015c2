"""Helpers for tests: an in-process switchboard and a small JSON client."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor

from treadmill.switchboard import credentials
from treadmill.switchboard.service import SwitchboardConfig, SwitchboardService


@dataclass
class Response:
    status: int
    body: Any
    headers: Any = None

    @property
    def error(self) -> str | None:
        if isinstance(self.body, dict) and "error" in self.body:
            return self.body["error"]["code"]
        return None


@dataclass
class Client:
    """A JSON client of the switchboard API, over real HTTP."""

    url: str
    token: str | None = None

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    async def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = await treq.request(method, self.url + path, data=data,
                                      headers=self.headers(headers))
        content = await response.content()
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content
        return Response(response.code, parsed, response.headers)

    async def get(self, path: str, **kw: Any) -> Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return await self.request("POST", path, body, **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> Response:
        return await self.request("PUT", path, body, **kw)

    async def patch(self, path: str, body: Any = None, **kw: Any) -> Response:
        return await self.request("PATCH", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> Response:
        return await self.request("DELETE", path, **kw)

    def as_user(self, token: str | None) -> Client:
        return Client(self.url, token)


@dataclass
class RunningSwitchboard:
    service: SwitchboardService
    url: str
    admin_token: str
    admin: Client = field(init=False)

    def __post_init__(self) -> None:
        self.admin = Client(self.url, self.admin_token)

    @property
    def store(self) -> Any:
        return self.service.store

    async def stop(self) -> None:
        await self.service.stopService()

    async def register_store(self, url: str, service: str, cache: bool = False) -> None:
        """Register an image store (``POST /api/v1/stores`` does the same for admins)."""
        from treadmill.images.oci import canonical_store_url

        await self.store.create_image_store(canonical_store_url(url), service, "", cache)

    async def user(self, name: str, admin: bool = False) -> Client:
        """Create a user with a token; return a client acting as that user."""
        row = await self.store.create_user(name, admin, None)
        token = credentials.new_token(credentials.USER_TOKEN_PREFIX)
        await self.store.create_token(row["id"], credentials.token_hash(token), "test", 3600)
        return Client(self.url, token)


async def start_switchboard(dsn: str, state: Path, **overrides: Any) -> RunningSwitchboard:
    """Start a switchboard service on a free loopback port and create an admin."""
    config = SwitchboardConfig(dsn=dsn, listen=["tcp:0:interface=127.0.0.1"],
                               signing_key=str(state / "capability-key.pem"), **overrides)
    service = SwitchboardService(reactor, config)
    service.startService()
    await service.ready()
    port = service.ports()[0].getHost().port
    row = await service.store.create_user("admin", True, None)
    token = credentials.new_token(credentials.USER_TOKEN_PREFIX)
    await service.store.create_token(row["id"], credentials.token_hash(token), "admin", None)
    return RunningSwitchboard(service, f"http://127.0.0.1:{port}", token)
