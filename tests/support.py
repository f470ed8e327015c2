"""Helpers for tests: an in-process switchboard, a small JSON client, a mock supervisor,
``tml`` in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor

from tests.logserver.support import Running as RunningLogServer
from tests.logserver.support import start_logserver
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.dev.fleet import ws_url_for
from treadmill.imagestore.service import ImageStoreConfig, ImageStoreService
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.drivers.mock import MockSettings
from treadmill.supervisor.service import SupervisorService
from treadmill.switchboard import credentials
from treadmill.switchboard.api import Limits
from treadmill.switchboard.service import SwitchboardConfig, SwitchboardService

MOCK_IMAGE = "sha256:" + "7" * 64
"""An image digest for the mock driver (it fetches nothing)."""


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

    def tml_env(self, home: Path, token: str | None = None) -> dict[str, str]:
        """The environment of a ``tml`` run against this switchboard: ``HOME``, its URL
        and ``token`` (the admin's unless given)."""
        return {"HOME": str(home), "TREADMILL_URL": self.url,
                "TREADMILL_TOKEN": token or self.admin_token}

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


def store_service(sb: RunningSwitchboard, root: Path, **more: Any) -> ImageStoreService:
    """An image store (or, with ``cache=``, a cache) on loopback that trusts ``sb``."""
    return ImageStoreService(reactor, ImageStoreConfig(
        root=str(root), listen=["tcp:0:interface=127.0.0.1"],
        keys_url=f"{sb.url}/.well-known/treadmill/capability-keys",
        realm=f"{sb.url}/api/v1/registry/token", access_log=False, **more))


def url_of(service: Any) -> str:
    """The base URL of a started service's first (loopback) listener."""
    return f"http://127.0.0.1:{service.ports()[0].getHost().port}"


@contextlib.asynccontextmanager
async def switchboard_with_logs(dsn: str, state: Path, limits: Limits | None = None,
                                **overrides: Any
                                ) -> AsyncIterator[tuple[RunningSwitchboard, RunningLogServer]]:
    """A switchboard (:func:`start_switchboard`) whose jobs ship their logs to one log
    server, started first in ``state/logs`` and trusting the switchboard's signing key;
    both stopped afterwards."""
    key = state / "capability-key.pem"
    load_or_create_signing_key(str(key))
    logs = await start_logserver(state / "logs", key)
    try:
        limits = dataclasses.replace(limits or Limits(), log_servers=(logs.url,), log_replicas=1)
        sb = await start_switchboard(dsn, state, limits=limits, **overrides)
        try:
            yield sb, logs
        finally:
            await sb.stop()
    finally:
        await logs.stop()


def mock_supervisor(switchboard_url: str, token: str, state_dir: Path, *,
                    stage_time: float = 0.01, config: dict[str, Any] | None = None,
                    **mock: Any) -> SupervisorService:
    """A started supervisor of the mock driver, linked to the switchboard at
    ``switchboard_url`` with the host token ``token``: each stage takes ``stage_time``
    seconds, ``mock`` holds the other :class:`MockSettings`, ``config`` the other
    :class:`SupervisorConfig` fields (reconnection is quick, nothing is fsynced)."""
    fields: dict[str, Any] = {"reconnect_initial": 0.1, "reconnect_max": 1.0, "durable": False,
                              **(config or {})}
    supervisor = SupervisorService(reactor, SupervisorConfig(
        url=ws_url_for(switchboard_url), token=token, state_dir=str(state_dir),
        driver_values=MockSettings(durations=dict.fromkeys(STAGES, stage_time),
                                   **mock).values(),
        **fields))
    supervisor.startService()
    return supervisor


async def closed_stream(admin: Client, log_url: str, job_id: str, name: str,
                        timeout: float = 20.0) -> bytes:
    """The bytes of the job's log stream ``name`` on the log server at ``log_url``, once
    it is closed (``admin`` gets the read token from the switchboard)."""
    access = (await admin.post(f"/api/v1/jobs/{job_id}/logs/token")).body
    headers = {"Authorization": f"Bearer {access['token']}"}

    async def closed() -> bool:
        r = await treq.get(f"{log_url}/v1/jobs/{job_id}/streams", headers=headers)
        if r.code != 200:  # a log server still starting
            await r.content()
            return False
        streams = {s["name"]: s for s in (await r.json())["streams"]}
        return bool(streams.get(name, {}).get("closed"))

    await eventually(closed, timeout=timeout)
    r = await treq.get(f"{log_url}/v1/jobs/{job_id}/streams/{name}", headers=headers)
    return await r.content()  # type: ignore[no-any-return]


async def run_tml(url: str, token: str, *argv: str) -> tuple[int, str]:
    """``tml --url URL ARGV`` in this process as the user of ``token`` (``TREADMILL_TOKEN``):
    its exit status and output (standard output and error together)."""
    out, err = io.StringIO(), io.StringIO()
    code = await tml(reactor, ["--url", url, *argv], out, err, {"TREADMILL_TOKEN": token})
    return code, out.getvalue() + err.getvalue()


def write_switchboard_config(path: Path, dsn: str, port: int, state: Path) -> Path:
    """A switchboard configuration file for ``twistd`` at ``path``: a loopback listener on
    ``port``, the database ``dsn``, the signing key in ``state``."""
    path.write_text(
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        "[database]\n"
        f'dsn = "{dsn}"\n'
        "[capabilities]\n"
        f'signing_key = "{state / "key.pem"}"\n'
        "[jobs]\n"
        "timeout_interval = 0.2\n")
    return path


async def add_host(admin: Client, name: str, tags: list[str], *,
                   anyone_starts: bool = True) -> str:
    """Register a host (``admin`` is an administrator's client); its host token. With
    ``anyone_starts``, every user may start jobs on it."""
    r = await admin.post("/api/v1/hosts", {"name": name, "tags": tags})
    assert r.status == 201, r.body
    if anyone_starts:
        await admin.post(f"/api/v1/hosts/{name}/grants", {"user": "*", "privilege": "start"})
    return r.body["token"]  # type: ignore[no-any-return]


async def mock_host(sb: RunningSwitchboard, state_dir: Path, **mock: Any) -> SupervisorService:
    """Host ``mock-1``, tagged ``mock``, registered on ``sb``, and its started supervisor of
    the mock driver (``mock``: :func:`mock_supervisor`'s settings); not yet connected."""
    token = await add_host(sb.admin, "mock-1", ["mock"], anyone_starts=False)
    return mock_supervisor(sb.url, token, state_dir, **mock)


async def mock_job(admin: Client, digest: str = MOCK_IMAGE, **fields: Any) -> str:
    """Submit a job of ``digest`` to the ``mock`` hosts (``fields``: more of its body); its
    id."""
    r = await admin.post("/api/v1/jobs", {"image": digest, "tags": ["mock"], **fields})
    assert r.status == 201, r.body
    return r.body["id"]  # type: ignore[no-any-return]


async def job_reaches(admin: Client, job_id: str, state: str,
                      timeout: float = 30.0) -> dict[str, Any]:
    """The job, as ``admin`` reads it, once it is in ``state``."""
    async def check() -> dict[str, Any] | None:
        body = (await admin.get(f"/api/v1/jobs/{job_id}")).body
        return body if body["state"] == state else None

    return await eventually(check, timeout=timeout)  # type: ignore[no-any-return]


async def final(admin: Client, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The job once it is terminated."""
    return await job_reaches(admin, job_id, "terminated", timeout)


@contextlib.asynccontextmanager
async def one_mock_host(dsn: str, state: Path, **overrides: Any
                        ) -> AsyncIterator[RunningSwitchboard]:
    """A switchboard (quick scheduling and timeouts; ``overrides``: its other config) with
    one connected mock host, ``mock-1`` tagged ``mock``, on which anyone may start jobs
    (stages of 0.02 s, 0.2 s of running); both stopped at the end."""
    sb = await start_switchboard(dsn, state, **{"scheduler_interval": 0.2,
                                                "timeout_interval": 0.1, **overrides})
    supervisor: SupervisorService | None = None
    try:
        token = await add_host(sb.admin, "mock-1", ["mock"])
        supervisor = mock_supervisor(sb.url, token, state / "mock-1", stage_time=0.02,
                                     run_time=0.2)
        await supervisor.ready()
        await supervisor.connected()
        yield sb
    finally:
        if supervisor is not None:
            await supervisor.stopService()
        await sb.stop()
