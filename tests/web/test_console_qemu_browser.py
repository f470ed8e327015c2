"""A QEMU demo job's console in a real headless Chromium: the guest's boot lines arrive
in the job page's terminal from the log server (switchboard, image store, log server and
a supervisor with the qemu driver under TCG, all real, on loopback)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.supervisor.qemu.conftest import BuiltImage, needs_qemu
from tests.supervisor.qemu.conftest import test_image as test_image  # the fixture
from tests.supervisor.qemu.support import push, qemu_host
from tests.support import store_service, url_of
from tests.web.browser import Browser, available
from tests.web.support import Stack, _log_in, _stack, _supervise, _user

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_qemu,
              pytest.mark.skipif(available() is not None, reason=str(available()))]


@pytest_twisted.async_yield_fixture
async def qemu_stack(database: str, tmp_path: Path, test_image: BuiltImage
                     ) -> AsyncIterator[Stack]:
    stops: list[Callable[[], Any]] = []
    work_dir = tempfile.mkdtemp(prefix="tq-", dir="/tmp")
    try:
        built = await _stack(database, tmp_path, stops)
        store = store_service(built.sb, tmp_path / "store")
        store.startService()
        stops.append(store.stopService)
        await store.ready()
        await push(built.sb, url_of(store), test_image, "demo/tiny-vm")
        await _supervise(await qemu_host(built.sb, "vm-1", tmp_path / "vm-1", work_dir), stops)
        yield built
    finally:
        for stop in reversed(stops):
            await stop()
        shutil.rmtree(work_dir, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_a_qemu_jobs_console_shows_the_guests_boot(qemu_stack: Stack, browser: Browser,
                                                        artifacts: None) -> None:
    sb = qemu_stack.sb
    ops = await _user(sb, "ops", admin=True)  # the image and vm-1 are an admin's
    r = await ops.post("/api/v1/jobs", {
        "image": "demo/tiny-vm", "tags": ["qemu"], "label": "boots in the browser",
        "parameters": {"command": {"value": "echo hello from the guest"}}})
    assert r.status == 201, r.body
    job_id = r.body["id"]
    await _log_in(browser, sb.url, "ops")
    await browser.get(f"{sb.url}/#/jobs/{job_id}")
    # The guest's /init speaks on the serial console as it boots, then runs the command.
    tail = await browser.wait_for(
        "(document.querySelector('#console')?.dataset.tail || '').includes('hello from the "
        "guest') && document.querySelector('#console').dataset.tail", 120)
    assert "treadmill-test-image: disk: " in tail, tail
    await browser.script("document.querySelector('#console').scrollIntoView()")
    await browser.wait_for("document.querySelector('#console .xterm-rows').textContent"
                           ".includes('treadmill-test-image')")
    await browser.wait_for("document.querySelector('#job-state [data-state]')?.dataset.state"
                           " === 'terminated'", 120)
    assert "exit 0" in await browser.script(
        "return document.querySelector('#job-termination').textContent")
