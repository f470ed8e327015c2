"""The web console's terminal renews its console token, in a real headless Chromium: with
console tokens of 3 s and a proxy grace of 0.5 s, a terminal stays open across token
lifetimes, and closes within the bound once its user's right on the job is revoked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.util.waiting import sleep
from tests.web.browser import Browser, available
from tests.web.support import DIGEST, Stack, _log_in, _user, mock_stack

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]

TTL = 3.0
GRACE = 0.5
STATUS = "document.querySelector('#terminal-status').textContent"
TAIL = "(document.querySelector('#terminal').dataset.tail || '')"


@pytest_twisted.async_yield_fixture
async def short_lived(database: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with mock_stack(database, tmp_path, console_token_ttl=TTL,
                          console_grace=GRACE) as built:
        yield built


@pytest_twisted.ensureDeferred
async def test_the_terminal_renews_its_token_until_the_right_is_revoked(
        short_lived: Stack, browser: Browser, artifacts: None) -> None:
    sb = short_lived.sb
    alice = await _user(sb, "alice")
    await _user(sb, "bob")
    job = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})).body
    grants = f"/api/v1/jobs/{job['id']}/grants"
    assert (await alice.post(grants, {"user": "bob", "privilege": "manage"})).status == 201

    await _log_in(browser, sb.url, "bob")
    await browser.get(f"{sb.url}/#/jobs/{job['id']}")
    await browser.wait_for("document.querySelector('tr[data-service=\"echo\"] .open-terminal')",
                           30)
    await browser.click("tr[data-service=\"echo\"] .open-terminal")
    await browser.wait_for(f"{STATUS}.includes('type here')")
    await browser.script("document.querySelector('#terminal').scrollIntoView()")
    await browser.type("#terminal .xterm-helper-textarea", "before", clear=False)
    await browser.wait_for(f"{TAIL}.includes('before')")
    await sleep(2 * TTL + GRACE)  # two more lifetimes: kept open by the page's renewals
    await browser.type("#terminal .xterm-helper-textarea", "after", clear=False)
    await browser.wait_for(f"{TAIL}.includes('after')")
    assert int(await browser.script(
        "return document.querySelector('#terminal').dataset.renewals")) >= 2
    assert "type here" in await browser.script(f"return {STATUS}")

    assert (await alice.delete(f"{grants}/bob/manage")).status in (200, 204)
    revoked = reactor.seconds()
    await browser.wait_for(f"{STATUS}.includes('expired and was not renewed')",
                           TTL + GRACE + 5)
    assert reactor.seconds() - revoked <= TTL + GRACE + 1.5
