"""The image store as operators run it: ``twistd treadmill-imagestore`` in its own process."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.client import FileBodyProducer

from tests.imagestore.support import (
    Keys,
    Registry,
    digest_of,
    write_config,
)
from tests.util.daemons import Daemon, run_twistd
from tests.util.ports import free_port
from tests.util.raw import raw_connect
from tests.util.waiting import eventually

MIB = 1024 * 1024


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class Pattern(io.RawIOBase):
    """``size`` bytes of a repeated random block, readable and seekable, never in memory."""

    def __init__(self, size: int, block: bytes):
        self.size = size
        self.block = block
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        out = bytearray()
        while len(out) < n:
            offset = (self.pos + len(out)) % len(self.block)
            out += self.block[offset:offset + n - len(out)]
        self.pos += n
        return bytes(out)


def pattern_digest(size: int, block: bytes) -> str:
    hasher = hashlib.sha256()
    source = Pattern(size, block)
    while chunk := source.read(4 * MIB):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    cases = [
        ('listen = ["tcp:0"]\n', "root"),
        (f'root = "{tmp_path}"\n', "auth.keys_file"),
        (f'root = "{tmp_path}"\n[auth]\nkeys_file = "/x"\n', "auth.realm"),
        (f'root = "{tmp_path}"\nanonymous_pull = 3\n', "anonymous_pull"),
        (f'root = "{tmp_path}"\n[gc]\ninterval = -1\n', "gc.interval"),
        (f'root = "{tmp_path}"\nservice = ""\n[auth]\nkeys_file = "/x"\nrealm = "http://sb/t"\n',
         "service: must not be empty"),
    ]
    for text, key in cases:
        config = tmp_path / "imagestore.toml"
        config.write_text(text)
        code, output = run_twistd("treadmill-imagestore", "--config", str(config))
        assert code != 0, text
        assert key in output, (text, output)


@pytest_twisted.ensureDeferred
async def test_memory_stays_flat_for_a_200_mib_blob(tmp_path: Path, keys: Keys) -> None:
    """Streaming, not buffering: the daemon's peak RSS barely moves (a bound, not a speed)."""
    port, metrics = free_port(), free_port()
    config = write_config(tmp_path / "imagestore.toml", tmp_path / "root", port, keys, metrics)
    daemon = Daemon("treadmill-imagestore", ["--config", str(config)])
    daemon.start()
    try:
        url = f"http://127.0.0.1:{port}"
        await daemon.wait_http(f"{url}/healthz")
        reg = Registry(url, keys.repo("big/blob", "pull", "push"))
        # Warm up every code path once.
        small = await reg.push_blob("big/blob", os.urandom(MIB))
        assert (await reg.request("GET", f"/v2/big/blob/blobs/{small}")).code == 200
        pid = daemon._transport.pid
        before = vm_hwm(pid)

        size = 200 * MIB
        block = os.urandom(MIB + 17)
        digest = pattern_digest(size, block)
        r = await reg.request("POST", "/v2/big/blob/blobs/uploads/")
        location = r.header("location")
        response = await treq.request(
            "PATCH", url + location,
            data=FileBodyProducer(Pattern(size, block), readSize=256 * 1024),
            headers={"authorization": f"Bearer {reg.token}",
                     "content-type": "application/octet-stream"})
        await response.content()
        assert response.code == 202
        r = await reg.request("PUT", f"{location}?digest={digest}")
        assert r.code == 201, r.body

        response = await treq.get(f"{url}/v2/big/blob/blobs/{digest}",
                                  headers={"authorization": f"Bearer {reg.token}"})
        assert response.code == 200
        hasher = hashlib.sha256()
        received = [0]

        def collect(data: bytes) -> None:
            hasher.update(data)
            received[0] += len(data)

        await treq.collect(response, collect)
        assert received[0] == size
        assert "sha256:" + hasher.hexdigest() == digest

        growth = vm_hwm(pid) - before
        assert growth < 64 * MIB, f"peak RSS grew by {growth / MIB:.1f} MiB"

        response = await treq.get(f"http://127.0.0.1:{metrics}/metrics")
        text = (await response.content()).decode()
        counted = re.search(r"^treadmill_imagestore_upload_bytes_total (\S+)$", text, re.M)
        assert counted is not None and float(counted.group(1)) >= size, text
        assert re.search(r"^treadmill_imagestore_blob_sent_bytes_total (\S+)$", text, re.M)
    finally:
        await daemon.stop()
    assert "Traceback (most recent" not in daemon.output, daemon.output


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_upload_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    root = tmp_path / "root"
    config = write_config(tmp_path / "imagestore.toml", root, port, None)
    daemon = Daemon("treadmill-imagestore", ["--config", str(config)])
    daemon.start()
    url = f"http://127.0.0.1:{port}"
    reg = Registry(url)
    committed = os.urandom(3 * MIB)
    pending = os.urandom(24 * MIB)
    proto: Any = None
    try:
        await daemon.wait_http(f"{url}/healthz")
        await reg.push_blob("lab/fw", committed)
        r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
        location = r.header("location")
        # Stream a long PATCH and kill the store while it is writing.
        proto = await raw_connect(port)
        proto.transport.write(
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(pending)}\r\n"
            f"Content-Range: 0-{len(pending) - 1}\r\n\r\n".encode())
        proto.transport.write(pending[:12 * MIB])
        deadline = reactor.seconds() + 10
        while True:
            r = await reg.request("GET", location)
            end = int(r.header("range").split("-")[1])
            if end > MIB or reactor.seconds() > deadline:
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert await daemon.signal(signal.SIGKILL) != 0
    finally:
        if proto is not None:
            proto.transport.abortConnection()
        await daemon.stop()

    daemon = Daemon("treadmill-imagestore", ["--config", str(config)])
    daemon.start()
    try:
        await daemon.wait_http(f"{url}/healthz")
        # The committed blob is intact; no other blob is visible.
        r = await reg.request("GET", f"/v2/lab/fw/blobs/{digest_of(committed)}")
        assert r.code == 200 and r.body == committed
        r = await reg.request("HEAD", f"/v2/lab/fw/blobs/{digest_of(pending)}")
        assert r.code == 404
        blobs = []
        for directory, _dirs, files in os.walk(root / "blobs"):
            for name in files:
                with open(os.path.join(directory, name), "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == name  # only complete blobs
                blobs.append(name)
        assert blobs == [digest_of(committed)[7:]]
        assert os.listdir(root / "tmp") == []
        # The interrupted upload resumes where the disk says it stopped.
        r = await reg.request("GET", location)
        assert r.code == 204
        offset = int(r.header("range").split("-")[1]) + 1
        assert MIB < offset <= 12 * MIB
        await reg.complete_upload(location, pending, offset)
    finally:
        await daemon.stop()
    assert "Traceback (most recent" not in daemon.output, daemon.output


@pytest_twisted.ensureDeferred
async def test_quotas_from_the_config_file(tmp_path: Path, keys: Keys) -> None:
    """The [quota] table of a real daemon's file: bytes and sessions refused with their
    codes, counted in the metrics, and the same after a SIGKILL and a restart."""
    port, metrics = free_port(), free_port()
    config = write_config(tmp_path / "imagestore.toml", tmp_path / "root", port, keys, metrics)
    with open(config, "a") as f:
        f.write('[quota]\nnamespaces = { alice = "2K" }\nuploads_per_subject = 1\n')
    url = f"http://127.0.0.1:{port}"
    alice = Registry(url, keys.repo("alice/fw", "pull", "push", subject="alice"))
    bob = Registry(url, keys.repo("bob/fw", "pull", "push", subject="bob"))
    daemon = Daemon("treadmill-imagestore", ["--config", str(config)])
    daemon.start()
    try:
        await daemon.wait_http(f"{url}/healthz")
        await alice.push_blob("alice/fw", b"a" * 1500)
        data = b"b" * 600
        r = await alice.request("POST", f"/v2/alice/fw/blobs/uploads/?digest={digest_of(data)}",
                                data)
        assert r.code == 403 and r.error == "DENIED"
        await bob.push_blob("bob/fw", data)
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        location = r.header("location")
        await alice.request("PATCH", location, b"c" * 500)
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        assert r.code == 429 and r.error == "TOOMANYREQUESTS" and r.header("retry-after")
        response = await treq.get(f"http://127.0.0.1:{metrics}/metrics")
        text = (await response.content()).decode()
        for limit in ("bytes", "sessions"):
            assert re.search(rf'^treadmill_imagestore_quota_refusals_total{{limit="{limit}"}} '
                             rf"1\.0$", text, re.M), text
        assert await daemon.signal(signal.SIGKILL) != 0
    finally:
        await daemon.stop()
    daemon = Daemon("treadmill-imagestore", ["--config", str(config)])
    daemon.start()
    try:
        await daemon.wait_http(f"{url}/healthz")
        # 1500 stored + 500 in the session: 48 bytes left, and still one session open.
        r = await alice.request("PATCH", location, b"d" * 49)
        assert r.code == 403 and "2000 bytes" in r.json["errors"][0]["message"]
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        assert r.code == 429
        r = await alice.request("DELETE", location)
        assert r.code == 204
        await alice.push_blob("alice/fw", b"e" * 548)
    finally:
        await daemon.stop()
    assert "Traceback (most recent" not in daemon.output, daemon.output


def test_a_busy_port_stops_the_daemon(tmp_path: Path) -> None:
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = write_config(tmp_path / "imagestore.toml", tmp_path / "store",
                              busy.getsockname()[1], None)
        code, output = run_twistd("treadmill-imagestore", "--config", str(config))
    assert code == 1, output
    assert "Address already in use" in output


@pytest_twisted.ensureDeferred
async def test_a_second_store_on_the_same_root_refuses_to_start(tmp_path: Path) -> None:
    """Two stores (or caches) on one root, e.g. a shared mount: the second would empty the
    first one's tmp/ (its pull-through fetches in flight) and adopt its upload sessions."""
    root = tmp_path / "root"
    first_port, second_port = free_port(), free_port()
    first = Daemon("treadmill-imagestore",
                   ["--config", str(write_config(tmp_path / "first.toml", root, first_port,
                                                 None))])
    second = Daemon("treadmill-imagestore",
                    ["--config", str(write_config(tmp_path / "second.toml", root, second_port,
                                                  None))])
    first.start()
    url = f"http://127.0.0.1:{first_port}"
    reg = Registry(url)
    try:
        await first.wait_http(f"{url}/healthz")
        r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
        location = r.header("location")
        r = await reg.request("PATCH", location, b"first half")
        assert r.code == 202
        in_flight = root / "tmp" / "fetch-in-flight"  # as a pull-through fetch writes
        in_flight.write_bytes(b"partial")
        second.start()
        await eventually(lambda: not second.running, timeout=30,
                         what="the second store to exit")
        assert await second.signal() != 0, second.output
        assert str(root) in second.output and "in use by another image store" in second.output
        assert in_flight.read_bytes() == b"partial"
        await reg.complete_upload(location, b"first half, second half", len(b"first half"))
    finally:
        await second.stop()
        await first.stop()
    # Stopped, the first lets the root go.
    second.start()
    try:
        await second.wait_http(f"http://127.0.0.1:{second_port}/healthz")
    finally:
        await second.stop()
    assert "Traceback (most recent" not in first.output, first.output
