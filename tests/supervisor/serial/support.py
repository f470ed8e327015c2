"""Helpers of the serial driver tests: the fake board process, board images, a recorder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.fakes import reporter
from tests.support import RunningSwitchboard
from tests.util.waiting import eventually
from treadmill.dev import fakeboard
from treadmill.dev.fleet import ws_url_for
from treadmill.images import format as fmt
from treadmill.supervisor.blobcache import blob_path
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.fetch import FetchedImage
from treadmill.supervisor.service import SupervisorService

until = partial(eventually, timeout=20.0, interval=0.05)
"""``eventually`` with the board tests' patience."""

FAKEBOARD = fakeboard.__file__
PY = sys.executable


class FakeBoard:
    """The fake board process (``fakeboard.py run DIR``) and its files."""

    def __init__(self, root: Path):
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def tty(self) -> str:
        return str(self.root / "tty")

    async def start(self) -> FakeBoard:
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([PY, FAKEBOARD, "run", str(self.root)])
        await until(lambda: (self.root / "pid").exists() and os.path.exists(self.tty))
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)

    def ctl(self, *command: str) -> None:
        subprocess.run([PY, FAKEBOARD, "ctl", str(self.root), *command], check=True)

    def events(self) -> list[str]:
        try:
            return (self.root / "events.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """``serial.*`` values driving this board with its tools."""
        root = str(self.root)
        values: dict[str, Any] = {
            "serial.device": self.tty,
            "serial.flash.command": [PY, FAKEBOARD, "flash", root, "{firmware}"],
            "serial.erase.command": [PY, FAKEBOARD, "erase", root],
            "serial.reset.command": [PY, FAKEBOARD, "ctl", root, "reset"],
            "serial.clean.after": "erase",
            "serial.health.pattern": "FakeBoard ok",
            "serial.health.timeout": 10.0,
            "serial.boot.ready": "agent",
            "serial.boot.timeout": 15.0,
            "serial.reopen_interval": 0.1,
            "serial.command_timeout": 20.0,
        }
        values.update({f"serial.{k.replace('__', '.')}": v for k, v in overrides.items()})
        return values


def board_manifest(files: dict[str, bytes], flash: Any = None) -> tuple[dict[str, Any], bytes]:
    manifest = fmt.build_board_manifest(
        [fmt.FirmwareFile(name, fmt.Blob(fmt.digest_of(data), len(data)))
         for name, data in files.items()], flash=flash)
    return manifest, fmt.manifest_bytes(manifest)


def write_cache(root: Path, files: dict[str, bytes], flash: Any = None) -> str:
    """A board image in an image store layout at ``root`` (a cache mount); its digest."""
    _, data = board_manifest(files, flash)
    (root / "treadmill-imagestore.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "treadmill-imagestore.json").write_text('{"layout": 1}')
    for blob in [data, *files.values()]:
        path = Path(blob_path(str(root), fmt.digest_of(blob)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return fmt.digest_of(data)


class FakeFetcher:
    """Hands out board images from a directory; counts releases."""

    def __init__(self, root: Path):
        self.root = root
        self.images: dict[str, tuple[dict[str, Any], bytes, dict[str, str]]] = {}
        self.released = 0

    def add(self, files: dict[str, bytes], flash: Any = None) -> dict[str, Any]:
        manifest, data = board_manifest(files, flash)
        paths = {}
        for blob in files.values():
            digest = fmt.digest_of(blob)
            path = self.root / hashlib.sha256(blob).hexdigest()
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            paths[digest] = str(path)
        digest = fmt.digest_of(data)
        self.images[digest] = (manifest, data, paths)
        return {"digest": digest, "name": "test/board", "stores": []}

    def can_fetch(self, image: Any) -> bool:
        return True

    async def fetch(self, image: dict[str, Any]) -> FetchedImage:
        from treadmill.supervisor.fetch import ImageFetchError

        if image["digest"] not in self.images:
            raise ImageFetchError("image_not_found", f"image {image['digest']}: not here")
        manifest, data, paths = self.images[image["digest"]]
        return FetchedImage(image["digest"], image.get("name"), fmt.parse_image(manifest), data,
                            paths)

    def release(self, fetched: FetchedImage | None) -> None:
        self.released += 1


def _within(fired: Deferred[Any], timeout: float) -> Deferred[Any]:
    """A new Deferred with ``fired``'s result, failing after ``timeout`` seconds."""
    out: Deferred[Any] = Deferred()
    fired.addBoth(lambda result: (out.called or out.callback(result), result)[1])
    return out.addTimeout(timeout, reactor)


class Recorder(reporter.Recorder):
    """Records reports as ``(what, args)``; ``ended`` and ``became_ready`` fail after 30 s."""

    @property
    def ended(self) -> Deferred[tuple[str, tuple[Any, ...]]]:
        """Fires with the final report (fails after 30 s)."""
        return _within(self._ended, 30.0)

    @property
    def became_ready(self) -> Deferred[None]:
        return _within(self._ready, 30.0)

    def _add(self, what: str, *args: Any) -> None:
        self.reports.append((what, args))


def job(job_id: str, image: dict[str, Any], **parameters: Any) -> dict[str, Any]:
    return {"id": job_id, "image": image, "timeout": 600, "tags": [], "label": None,
            "parameters": {k: v if isinstance(v, dict) else {"value": v}
                           for k, v in parameters.items()}}


@contextlib.asynccontextmanager
async def board_host(sb: RunningSwitchboard, board: FakeBoard, tmp_path: Path,
                     **driver: Any) -> AsyncIterator[SupervisorService]:
    """Host ``board-1`` (tag board) and its supervisor (serial driver on ``board``, the
    image cache in ``tmp_path / "cache"``, ``driver`` settings as for
    :meth:`FakeBoard.settings`), connected to ``sb``; stopped afterwards."""
    r = await sb.admin.post("/api/v1/hosts", {"name": "board-1", "tags": ["board"]})
    assert r.status == 201, r.body
    supervisor = SupervisorService(reactor, SupervisorConfig(
        url=ws_url_for(sb.url), token=r.body["token"], state_dir=str(tmp_path / "sup"),
        reconnect_initial=0.1, reconnect_max=1.0, durable=False, driver="serial",
        images_cache_mount=str(tmp_path / "cache"), driver_values=board.settings(**driver)))
    supervisor.startService()
    try:
        await supervisor.ready()
        await supervisor.connected()
        yield supervisor
    finally:
        await supervisor.stopService()
        await supervisor.driver.shutdown()

