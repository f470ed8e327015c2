"""The web console's terminal renews its console token, in a real headless Chromium: with
console tokens of 3 s and a proxy grace of 2 s, a terminal stays open across token
lifetimes, and closes within the bound once its user's right on the job is revoked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.util.waiting import sleep
from tests.web.browser import Browser, available
from tests.web.support import Stack, mock_stack, open_terminal, shared_job, type_echoed

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]

TTL = 3.0
GRACE = 2.0  # room for a slow renewal on a loaded machine
SLACK = 3.0  # the close travelling from the proxy to the page
STATUS = "document.querySelector('#terminal-status').textContent"


@pytest_twisted.async_yield_fixture
async def short_lived(database: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with mock_stack(database, tmp_path, console_token_ttl=TTL,
                          console_grace=GRACE) as built:
        yield built


@pytest_twisted.ensureDeferred
async def test_the_terminal_renews_its_token_until_the_right_is_revoked(
        short_lived: Stack, browser: Browser, artifacts: None) -> None:
    sb = short_lived.sb
    alice, job = await shared_job(sb, "manage")
    await open_terminal(browser, sb.url, "bob", job["id"])
    await type_echoed(browser, "before")
    await sleep(2 * TTL)  # two more lifetimes: kept open by the page's renewals
    await type_echoed(browser, "after")
    assert int(await browser.script(
        "return document.querySelector('#terminal').dataset.renewals")) >= 2
    assert "type here" in await browser.script(f"return {STATUS}")

    revoke = f"/api/v1/jobs/{job['id']}/grants/bob/manage"
    assert (await alice.delete(revoke)).status in (200, 204)
    revoked = reactor.seconds()
    await browser.wait_for(f"{STATUS}.includes('expired and was not renewed')",
                           TTL + GRACE + 2 * SLACK)
    assert reactor.seconds() - revoked <= TTL + GRACE + SLACK
