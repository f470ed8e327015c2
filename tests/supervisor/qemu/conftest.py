"""Fixtures of the QEMU driver tests: the test image (built once per session), a
fetcher that hands it out, a reporter that records, and a driver on the real reactor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from treadmill.images import format as fmt
from treadmill.supervisor.fetch import FetchedImage, ImageFetchError

ROOT = Path(__file__).resolve().parents[3]
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None and shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64/qemu-img not "
                                "installed (tools/setup-env installs them)")


@dataclass
class BuiltImage:
    info: dict[str, Any]
    manifest: bytes
    digest: str

    def fetched(self) -> FetchedImage:
        image = fmt.parse_image(fmt.load_manifest(self.manifest))
        paths = {}
        for name, desc in image.files():
            paths[desc.digest] = os.path.join(self.info["dir"], name)
        return FetchedImage(self.digest, "demo", image, self.manifest, paths)


@pytest.fixture(scope="session")
def test_image() -> BuiltImage:
    """The image of tools/build-test-image, built (or reused) in the user's cache."""
    if not HAVE_QEMU:
        pytest.skip("QEMU is not installed")
    cache = os.environ.get("TREADMILL_TEST_IMAGE_CACHE",
                           os.path.expanduser("~/.cache/treadmill/test-image"))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build-test-image"),
                             "--cache", cache, "--json"], capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        pytest.fail(f"tools/build-test-image failed: {result.stderr[-2000:]}")
    info = json.loads(result.stdout)
    manifest = Path(info["manifest"]).read_bytes()
    return BuiltImage(info, manifest, fmt.digest_of(manifest))


class FakeFetcher:
    """Hands out the test image (any digest), counting fetches and releases."""

    def __init__(self, image: BuiltImage | None, error: ImageFetchError | None = None):
        self.image = image
        self.error = error
        self.fetched = 0
        self.released = 0
        self.pinned: list[str] = []

    def can_fetch(self, image: Any) -> bool:
        return True

    async def fetch(self, image: Any) -> FetchedImage:
        if self.error is not None:
            raise self.error
        assert self.image is not None
        self.fetched += 1
        return self.image.fetched()

    def release(self, fetched: Any) -> None:
        if fetched is not None:
            self.released += 1

    def pin(self, digests: Any, image: Any = None) -> None:
        self.pinned.extend(digests)

    def release_digests(self, digests: Any) -> None:
        for d in digests:
            self.pinned.remove(d)


@pytest.fixture
def work_dir() -> Iterator[str]:
    """A short directory for job work dirs (UNIX socket paths are short); the kept
    disks go beside it (``WORK_DIR-kept``)."""
    path = tempfile.mkdtemp(prefix="tq-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path + "-kept", ignore_errors=True)  # the default qemu.kept_dir


def qemu_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[-1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != b"Z" and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids
