"""The web console in a real headless Chromium against real daemons: a switchboard, a log
server and a supervisor with the mock driver (one browser for the module)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from tests.web.browser import Browser, available
from tests.web.support import (
    DIGEST,
    Stack,
    _log_in,
    _user,
    open_terminal,
    shared_job,
    type_echoed,
)
from tests.web.support import stack as stack  # the fixture: the daemons

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


@pytest_twisted.ensureDeferred
async def test_submit_watch_cancel_and_log_out(stack: Stack, browser: Browser,
                                               artifacts: None) -> None:
    sb = stack.sb
    await _user(sb, "ops", admin=True)
    await _log_in(browser, sb.url, "ops")
    # The session's token is out of the page's reach.
    assert "treadmill_session" not in await browser.script("return document.cookie")
    session = (await browser.run(browser.driver.get_cookie, "treadmill_session"))["value"]

    # Submit a mock job whose label is hostile markup.
    await browser.get(f"{sb.url}/#/submit")
    await browser.wait_for("document.querySelector('#submit-form')")
    await browser.type("#submit-image", DIGEST)
    await browser.type("#submit-tags", "mock")
    await browser.type("#submit-label", HOSTILE)
    await browser.click("#add-param")
    await browser.type(".param-name", "TOKEN")
    await browser.type(".param-value", "s3cret-value")
    await browser.click(".param-secret")
    await browser.snap("submit")
    await browser.click("#submit-form button[type=submit]")
    job_id = await browser.wait_for(
        "(location.hash.match(/^#\\/jobs\\/([0-9a-f-]{36})$/) || [])[1]")
    await browser.wait_for("document.querySelector('#job-label')")

    # The label is text, never markup; the secret is masked.
    assert await browser.script("return document.querySelector('#job-label').textContent"
                                ) == HOSTILE
    assert await browser.script("return document.querySelector('#job-label').children.length"
                                ) == 0
    assert await browser.script("return window.pwned === undefined")
    # (The parameters render with the rest of the job: wait for them, then look.)
    await browser.wait_for("document.body.innerText.includes('(secret)')")
    page_text = await browser.script("return document.body.innerText")
    assert "s3cret-value" not in page_text and "(secret)" in page_text

    # The console arrives live, from the log server, into the terminal.
    await browser.wait_for("Number(document.querySelector('#console').dataset.bytes) > 0", 30)
    tail = await browser.wait_for(
        "document.querySelector('#console').dataset.tail.includes('mock console') && "
        "document.querySelector('#console').dataset.tail", 30)
    assert f"mock console {job_id[:8]}" in tail
    first = int(await browser.script("return document.querySelector('#console').dataset.bytes"))
    await browser.wait_for(f"Number(document.querySelector('#console').dataset.bytes) > {first}")
    # xterm.js renders only what is on screen.
    await browser.script("document.querySelector('#console').scrollIntoView()")
    await browser.wait_for("document.querySelector('#console .xterm-rows').textContent"
                           ".includes('mock console')")
    await browser.script("window.scrollTo(0, 0)")
    await browser.snap("job")
    await browser.script("document.querySelector('#console').scrollIntoView()")
    await browser.snap("job-console")

    # Cancel: the page follows the job to its end over the SSE watch; the host is free.
    await browser.wait_for("['initializing', 'ready'].includes(document.querySelector("
                           "'#job-state [data-state]')?.dataset.state)", 30)
    await browser.click("#cancel")
    await browser.accept_dialog()
    await browser.wait_for("document.querySelector('#job-state [data-state]')?.dataset.state"
                           " === 'terminated'", 30)
    assert not await browser.script("return document.querySelector('#cancel')")
    timeline = await browser.script("return document.querySelector('#timeline').innerText")
    assert "queued" in timeline and "terminated" in timeline
    await browser.get(f"{sb.url}/#/hosts")
    await browser.wait_for("document.querySelector('tr[data-host=\"mock-1\"]')")
    await browser.wait_for("document.querySelector('tr[data-host=\"mock-1\"] .current-job')"
                           ".textContent === ''", 30)
    await browser.snap("hosts")
    # The jobs list shows it, as text.
    await browser.get(f"{sb.url}/#/jobs")
    await browser.wait_for(f"document.querySelector('tr[data-job=\"{job_id}\"] .label')")
    assert await browser.script(
        f"return document.querySelector('tr[data-job=\"{job_id}\"] .label').textContent"
    ) == HOSTILE
    # Filters: the ended job is not active.
    await browser.script("document.querySelector('#filter-state').value = 'active';"
                         "document.querySelector('form.inline button[type=submit]').click()")
    await browser.wait_for("document.querySelector('#jobs tbody').textContent"
                           ".includes('No jobs.')")
    await browser.script("document.querySelector('#filter-state').value = 'terminated';"
                         "document.querySelector('form.inline button[type=submit]').click()")
    await browser.wait_for(f"document.querySelector('tr[data-job=\"{job_id}\"]')")
    await browser.snap("jobs")
    for page in ("images", "tokens", "users"):
        await browser.get(f"{sb.url}/#/{page}")
        await browser.wait_for(f"document.body.dataset.page === '{page}' && "
                               "!document.querySelector('main > p.muted')")
        await browser.snap(page)

    # The page lives within its Content-Security-Policy.
    log = await browser.run(browser.driver.get_log, "browser")
    assert not [e for e in log if "Content Security Policy" in str(e.get("message"))], log

    # Log out revokes the session's token.
    await browser.click("#logout")
    await browser.wait_for("document.querySelector('#login-form')")
    await browser.snap("login")
    r = await sb.admin.as_user(session).get("/api/v1/whoami")
    assert r.status == 401


@pytest_twisted.ensureDeferred
async def test_without_privilege_no_cancel_and_csrf(stack: Stack, browser: Browser,
                                                    artifacts: None) -> None:
    sb = stack.sb
    alice = await _user(sb, "alice")
    await _user(sb, "bob")
    job = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"],
                                             "label": "alice's job"})).body
    r = await alice.post(f"/api/v1/jobs/{job['id']}/grants", {"user": "bob",
                                                              "privilege": "read"})
    assert r.status == 201, r.body

    await _log_in(browser, sb.url, "bob")
    await browser.get(f"{sb.url}/#/jobs/{job['id']}")
    await browser.wait_for("document.querySelector('#job-label')?.textContent === "
                           "\"alice's job\"")
    await browser.wait_for("document.querySelector('#console-status')")
    assert not await browser.script("return document.querySelector('#cancel')")
    assert not await browser.script("return document.querySelector('#snapshot')")

    # The API refuses anyway; and without the CSRF header, before looking.
    fetch = """
        const done = arguments[arguments.length - 1];
        const headers = {"Content-Type": "application/json"};
        if (arguments[1]) headers["X-CSRF-Token"] = decodeURIComponent(
            document.cookie.match(/treadmill_csrf=([^;]+)/)[1]);
        fetch(arguments[0], {method: "POST", headers, body: "{}"})
            .then(async r => done([r.status, await r.text()]), e => done([0, String(e)]));
    """
    terminate = f"/api/v1/jobs/{job['id']}/terminate"
    status, body = await browser.call_async(fetch, terminate, True)
    assert status == 403 and "may not stop" in body
    status, body = await browser.call_async(fetch, terminate, False)
    assert status == 403 and "CSRF" in body
    # The job runs on.
    assert (await alice.get(f"/api/v1/jobs/{job['id']}")).body["state"] in (
        "assigned", "initializing", "ready")

    # An expired (here: revoked) session sends the page back to the login form.
    session = (await browser.run(browser.driver.get_cookie, "treadmill_session"))["value"]
    r = await treq.delete(f"{sb.url}/console/session", cookies={
        "treadmill_session": session, "treadmill_csrf": "x"}, headers={
        "X-CSRF-Token": (await browser.run(browser.driver.get_cookie,
                                           "treadmill_csrf"))["value"]})
    assert r.code == 204
    await browser.get(f"{sb.url}/#/hosts")
    await browser.wait_for("document.querySelector('#login-form')")


@pytest_twisted.ensureDeferred
async def test_web_terminal_types_with_manage_and_watches_with_read(
        stack: Stack, browser: Browser, artifacts: None) -> None:
    sb = stack.sb
    _, job = await shared_job(sb, "read")

    await open_terminal(browser, sb.url, "alice", job["id"])
    await type_echoed(browser, "hello from the web")
    await browser.script("document.querySelector('#endpoints').scrollIntoView()")
    await browser.snap("terminal")

    # bob may only watch: no terminal to type into, and a read token.
    await _log_in(browser, sb.url, "bob")
    await browser.get(f"{sb.url}/#/jobs/{job['id']}")
    await browser.wait_for("document.querySelector('tr[data-service=\"echo\"] .watch-terminal')",
                           30)
    assert not await browser.script(
        "return document.querySelector('tr[data-service=\"echo\"] .open-terminal')")
    await browser.click("tr[data-service=\"echo\"] .watch-terminal")
    await browser.wait_for("document.querySelector('#terminal-status').textContent"
                           ".includes('read only')")


@pytest_twisted.ensureDeferred
async def test_hostile_console_and_descriptions_and_a_live_list(stack: Stack, browser: Browser,
                                                              artifacts: None) -> None:
    sb = stack.sb
    ops = await _user(sb, "ops", admin=True)
    r = await ops.post("/api/v1/images", {"name": "demo/hostile", "digest": DIGEST,
                                          "stores": [], "description": HOSTILE})
    assert r.status == 201, r.body
    r = await ops.post("/api/v1/hosts", {"name": "evil-1", "description": HOSTILE})
    assert r.status == 201, r.body
    await _log_in(browser, sb.url, "ops")

    # The jobs list follows a job it did not load: it appears, and its state moves live.
    await browser.get(f"{sb.url}/#/jobs")
    await browser.wait_for("document.querySelector('#jobs tbody').textContent.includes('No jobs.')")
    # A console that tries markup, a window title, the clipboard and a javascript: link.
    console = (HOSTILE + "\r\n\x1b]0;pwned title\x07\x1b]52;c;cHduZWQ=\x07"
               "\x1b]8;;javascript:window.pwned=3\x07click me\x1b]8;;\x07\r\n")
    r = await ops.post("/api/v1/jobs", {"image": "demo/hostile", "tags": ["mock"],
                                        "parameters": {"mock.console": {"value": console},
                                                       "mock.console_rate": {"value": "0"}}})
    assert r.status == 201, r.body
    job_id = r.body["id"]
    row = f"document.querySelector('tr[data-job=\"{job_id}\"]')"
    await browser.wait_for(f"{row}?.querySelector('[data-state=\"ready\"]')", 30)
    await ops.post(f"/api/v1/jobs/{job_id}/terminate")
    await browser.wait_for(f"{row}.querySelector('[data-state=\"terminated\"]')", 30)

    # The console's bytes are text in the terminal: no element, no script, no title.
    await browser.get(f"{sb.url}/#/jobs/{job_id}")
    await browser.wait_for("(document.querySelector('#console')?.dataset.tail || '')"
                           ".includes('click me')", 30)
    await browser.script("document.querySelector('#console').scrollIntoView()")
    await browser.wait_for("document.querySelector('#console .xterm-rows').textContent"
                           ".includes('<script>window.pwned=1</script>')")
    assert await browser.script("return document.querySelectorAll('main img, main script')"
                                ".length") == 0
    assert await browser.script("return document.title") == "Treadmill"

    # Descriptions of images and hosts are text too.
    for page, selector in (("images", 'tr[data-image="demo/hostile"]'),
                           ("hosts", 'tr[data-host="evil-1"]')):
        await browser.get(f"{sb.url}/#/{page}")
        await browser.wait_for(f"document.querySelector('{selector}')")
        assert HOSTILE in await browser.script(
            f"return document.querySelector('{selector}').textContent")
        assert await browser.script(
            f"return document.querySelectorAll('{selector} img, {selector} script').length"
        ) == 0
    await browser.get(f"{sb.url}/#/submit")
    await browser.wait_for("document.querySelector('#catalogue option')")
    assert await browser.script("return document.querySelector('#catalogue option')"
                                ".textContent") == HOSTILE
    assert await browser.script("return window.pwned === undefined")


@pytest_twisted.ensureDeferred
async def test_many_tabs_of_the_jobs_page_leave_connections_for_the_next(
        stack: Stack, browser: Browser, artifacts: None) -> None:
    """Each jobs page watches up to three active jobs over SSE; a browser holds six
    connections per origin for all its tabs. Pages left or hidden give theirs back, so
    the fourth tab (and a reload) still loads at once."""
    sb = stack.sb
    ops = await _user(sb, "ops", admin=True)
    for i in range(4):  # queued: no host has the tag
        r = await ops.post("/api/v1/jobs", {"image": DIGEST, "tags": ["nowhere"],
                                            "label": f"waiting {i}"})
        assert r.status == 201, r.body
    await _log_in(browser, sb.url, "ops")
    driver = browser.driver
    first = driver.current_window_handle

    async def jobs_page_loads() -> float:
        began = reactor.seconds()
        await browser.get(f"{sb.url}/#/jobs")
        await browser.wait_for("document.querySelectorAll('#jobs tr[data-job]').length === 4")
        return reactor.seconds() - began

    try:
        for _ in range(4):
            await browser.run(driver.switch_to.new_window, "tab")
            assert await jobs_page_loads() < 5
        # Left pages too: about:blank in between, then the page again.
        for _ in range(3):
            await browser.get("about:blank")
            assert await jobs_page_loads() < 5
    finally:
        for handle in await browser.run(lambda: driver.window_handles):
            if handle != first:
                await browser.run(driver.switch_to.window, handle)
                await browser.run(driver.close)
        await browser.run(driver.switch_to.window, first)


@pytest_twisted.ensureDeferred
async def test_results_show_while_the_job_runs_and_stay_text(stack: Stack, browser: Browser,
                                                             artifacts: None) -> None:
    """A job's results (here its agent's, without console patterns) appear on its page
    while it runs, not only once it ended, then with the summary; names are text."""
    sb = stack.sb
    ops = await _user(sb, "ops", admin=True)
    agent = ('{"type": "test_case", "name": %s, "result": "fail", "message": "<b>m</b>"}'
             % json.dumps(HOSTILE))
    r = await ops.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"], "parameters": {
        "mock.agent": {"value": agent}, "mock.console_rate": {"value": "0"}}})
    assert r.status == 201, r.body
    job_id = r.body["id"]
    await _log_in(browser, sb.url, "ops")
    await browser.get(f"{sb.url}/#/jobs/{job_id}")
    await browser.wait_for("document.querySelector('#job-state [data-state]')?.dataset.state"
                           " === 'ready'", 30)
    await browser.wait_for("!document.querySelector('#results-section').hidden && "
                           "document.querySelector('#results').textContent.includes("
                           "'window.pwned=2')", 20)
    assert await browser.script("return document.querySelector('#job-state [data-state]')"
                                ".dataset.state") == "ready"
    await ops.post(f"/api/v1/jobs/{job_id}/terminate")
    await browser.wait_for("document.querySelector('#results').textContent"
                           ".includes('\"type\":\"summary\"')", 30)
    text = await browser.script("return document.querySelector('#results').textContent")
    assert text.count('"type":"test_case"') == 1, text  # read on, not read twice
    assert await browser.script("return document.querySelectorAll('main img, main script, "
                                "main b').length") == 0
    assert await browser.script("return window.pwned === undefined")


@pytest_twisted.ensureDeferred
async def test_an_event_source_on_an_ended_job_gets_each_event_once_and_stops(
        stack: Stack, browser: Browser, artifacts: None) -> None:
    """A dashboard's EventSource on a job's watch (docs/api.md): the stream ends after
    ``terminated``, the browser reconnects with ``Last-Event-ID``, and is told to stop
    (it used to be sent every event again every 3 s)."""
    sb = stack.sb
    ops = await _user(sb, "ops", admin=True)
    r = await ops.post("/api/v1/jobs", {"image": DIGEST, "tags": ["nowhere"]})
    assert r.status == 201, r.body
    job_id = r.body["id"]
    await ops.post(f"/api/v1/jobs/{job_id}/terminate")  # queued: terminated at once
    await _log_in(browser, sb.url, "ops")
    await browser.script(
        "window.seen = []; window.opened = 0;"
        f"window.watch = new EventSource('/api/v1/jobs/{job_id}/events/watch');"
        "watch.addEventListener('open', () => { window.opened += 1; });"
        "watch.addEventListener('job', (e) => window.seen.push(JSON.parse(e.data).seq));")
    await browser.wait_for("window.watch.readyState === EventSource.CLOSED", 20)
    assert await browser.script("return window.seen") == [1, 2]
    assert await browser.script("return window.opened") == 1
