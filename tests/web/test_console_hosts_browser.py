"""The web console's operator side in a real headless Chromium against real daemons: held
hosts and why a job waits, host health and its history, host and user management,
readable errors, the console's follow and scroll-back, the full log's download."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import pytest_twisted
import treq

from tests.util.waiting import eventually
from tests.web.browser import Browser, available
from tests.web.support import DIGEST, PASSWORD, Stack, _log_in, _user
from tests.web.support import stack as stack  # the fixture: the daemons

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]

CONSOLE = "document.querySelector('#console').dataset"
JOB_ID = "(location.hash.match(/^#\\/jobs\\/([0-9a-f-]{36})$/) || [])[1]"


def host_row(host: str, inner: str = "") -> str:
    """A JavaScript expression: the hosts page's row of ``host`` (or an element in it)."""
    return f"document.querySelector('tr[data-host=\"{host}\"] {inner}'.trim())"


async def notice(browser: Browser) -> str:
    return await browser.wait_for(
        "!document.querySelector('#notice').hidden && "
        "document.querySelector('#notice').textContent")


@pytest_twisted.ensureDeferred
async def test_held_host_and_why_a_job_waits(stack: Stack, browser: Browser,
                                             artifacts: None) -> None:
    sb = stack.sb
    alice = await _user(sb, "alice")
    await _user(sb, "ops", admin=True)
    await _log_in(browser, sb.url, "alice")

    # Submit a job that fails, asking to hold its host for 30 minutes.
    await browser.get(f"{sb.url}/#/submit")
    await browser.wait_for("document.querySelector('#submit-form')")
    await browser.type("#submit-image", DIGEST)
    await browser.type("#submit-tags", "mock")
    for name, value in (("mock.exit_status", "3"), ("mock.run_time", "0.2")):
        await browser.click("#add-param")
        await browser.type(".param:last-child .param-name", name)
        await browser.type(".param:last-child .param-value", value)
    await browser.type("#submit-hold", "30")
    await browser.click("#submit-form button[type=submit]")
    held_id = await browser.wait_for(JOB_ID)
    body = (await alice.get(f"/api/v1/jobs/{held_id}")).body
    assert body["hold_on_failure"] == 1800, body

    # Its page says the host is held, until when, and offers to release it.
    held = await browser.wait_for("document.querySelector('#job-held')?.textContent", 30)
    assert held.startswith("mock-1 is held for debugging until "), held
    assert await browser.script("return document.querySelector('#job-hold').textContent"
                                ) == "30 min"
    assert "exit 3" in await browser.script(
        "return document.querySelector('#job-termination').textContent")
    assert await browser.script("return document.querySelector('#release') !== null")

    # Another job waits; the hosts page shows who holds the host.
    waiting = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})).body["id"]
    await _log_in(browser, sb.url, "ops")
    await browser.get(f"{sb.url}/#/hosts")
    holder = await browser.wait_for(f"{host_row('mock-1', '.held')}?.textContent")
    assert holder.startswith("held by alice until "), holder
    assert await browser.script(f"return {host_row('mock-1', '.current-job a')}.textContent"
                                ) == held_id[:8]

    # Drained, the host is out of service: the waiting job's page says why it waits.
    await browser.click('tr[data-host="mock-1"] .drain')
    await browser.wait_for(f"{host_row('mock-1', '.enabled')}?.textContent === 'no'")
    await browser.snap("hosts-held")
    await browser.get(f"{sb.url}/#/jobs/{waiting}")
    message = await browser.wait_for("document.querySelector('#job-message')?.textContent", 30)
    assert message == "waiting: every host that could run it is out of service: mock-1 (drained)"
    # Its console does not exist yet: the log server waits for its first byte.
    await browser.wait_for("document.querySelector('#console-status').textContent === "
                           "\"waiting for the console's first byte\"")
    await browser.snap("job-waiting")
    await browser.get(f"{sb.url}/#/jobs")
    assert await browser.wait_for(
        f"document.querySelector('tr[data-job=\"{waiting}\"] .waiting')?.textContent") == message
    await browser.get(f"{sb.url}/#/jobs/{waiting}")
    await browser.wait_for("document.querySelector('#job-message')")
    # Enabled again, the message goes (the page re-reads a queued job by itself).
    r = await sb.admin.post("/api/v1/hosts/mock-1/enable")
    assert r.status == 200, r.body
    await browser.wait_for("!document.querySelector('#job-message')", 30)
    assert await browser.script(
        "return document.querySelector('#job-state [data-state]').dataset.state") == "queued"

    # Releasing the held host from the failed job's page lets the waiting job run.
    await browser.get(f"{sb.url}/#/jobs/{held_id}")
    await browser.wait_for("document.querySelector('#release')")
    await browser.click("#release")
    await browser.accept_dialog()
    await browser.wait_for("!document.querySelector('#release')", 30)
    await browser.get(f"{sb.url}/#/jobs/{waiting}")
    await browser.wait_for("['assigned', 'initializing', 'ready'].includes(document.querySelector("
                           "'#job-state [data-state]')?.dataset.state)", 30)
    assert (await alice.get(f"/api/v1/jobs/{held_id}")).body["held_until"] is None


@pytest_twisted.ensureDeferred
async def test_host_health_history_and_management(stack: Stack, browser: Browser,
                                                  artifacts: None) -> None:
    sb = stack.sb
    ops = await _user(sb, "ops", admin=True)
    await _user(sb, "bob")
    # A health check that fails, after every job.
    quick = {"mock.run_time": {"value": "0.1"}}
    r = await ops.put("/api/v1/health-checks/hosts/mock-1", {
        "image": DIGEST, "expect_exit": 0, "every_jobs": 1,
        "parameters": {**quick, "mock.exit_status": {"value": "1"}}})
    assert r.status == 200, r.body
    r = await ops.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"], "parameters": quick})
    assert r.status == 201, r.body

    async def unhealthy() -> bool:
        return (await ops.get("/api/v1/hosts/mock-1")).body["healthy"] is False

    await eventually(unhealthy, timeout=30)

    await _log_in(browser, sb.url, "ops")
    await browser.get(f"{sb.url}/#/hosts")
    await browser.wait_for(f"{host_row('mock-1', '.healthy')}?.textContent.startsWith('no')")
    # Enabled but out of service: the way back is offered.
    assert await browser.script(f"return {host_row('mock-1', '.enabled')}.textContent") == "yes"
    assert await browser.script(f"return {host_row('mock-1', '.enable')}.textContent"
                                ) == "Back in service"
    await browser.click('tr[data-host="mock-1"] .health')
    failed = await browser.wait_for(
        "document.querySelector('#host-health tr[data-event=\"check_failed\"]')?.textContent")
    assert "exit status 1" in failed, failed
    assert "every 1 jobs" in await browser.script(
        "return document.querySelector('#health-check').textContent")
    await browser.snap("host-health")
    await browser.click('tr[data-host="mock-1"] .enable')
    await browser.wait_for(f"{host_row('mock-1', '.healthy')}?.textContent === 'yes'")
    await browser.click('tr[data-host="mock-1"] .health')
    enabled = await browser.wait_for(
        "document.querySelector('#host-health tr[data-event=\"enabled\"]')?.textContent")
    assert "ops" in enabled, enabled

    # The admin changes the host's check from the page, then removes it.
    await browser.wait_for("document.querySelector('#health-check-form .check-image')"
                           f".value === {DIGEST!r}")
    await browser.type("#health-check-form .check-every-jobs", "5")
    await browser.click("#health-check-form button[type=submit]")
    await browser.wait_for("document.querySelector('#health-check')?.textContent"
                           ".includes('every 5 jobs')")
    checks = (await ops.get("/api/v1/health-checks")).body["checks"]
    assert [(c["target"], c["every_jobs"], c["set_by"]) for c in checks] == [
        ("mock-1", 5, "ops")]
    await browser.click("#health-check-remove")
    await browser.wait_for("document.querySelector('#health-check')?.textContent === 'none'")
    assert (await ops.get("/api/v1/health-checks")).body["checks"] == []

    # Tags, as the host's manager.
    await browser.click('tr[data-host="mock-1"] .edit-tags')
    await browser.accept_dialog("mock lab-2")
    await browser.wait_for(f"{host_row('mock-1', '.tags')}?.textContent === 'mock, lab-2'")
    assert (await ops.get("/api/v1/hosts/mock-1")).body["tags"] == ["mock", "lab-2"]

    # Users: an admin sets bob's password, and bob logs in with it.
    await browser.get(f"{sb.url}/#/users")
    await browser.wait_for("document.querySelector('tr[data-user=\"bob\"] .new-password')")
    await browser.type('tr[data-user="bob"] .new-password', "a new password")
    await browser.click('tr[data-user="bob"] .set-password button')
    assert (await notice(browser)) == "The password of bob is set."
    r = await treq.post(f"{sb.url}/console/session", json={"user": "bob", "password": PASSWORD},
                        headers={"X-CSRF-Token": "login"})
    assert r.code == 401
    await r.content()
    r = await treq.post(f"{sb.url}/console/session",
                        json={"user": "bob", "password": "a new password"},
                        headers={"X-CSRF-Token": "login"})
    assert r.code == 201
    await r.content()

    # A new host token is shown once; the old one stops working.
    await browser.get(f"{sb.url}/#/hosts")
    await browser.wait_for(host_row("mock-1", ".new-token"))
    await browser.click('tr[data-host="mock-1"] .new-token')
    await browser.accept_dialog()
    token = await browser.wait_for("document.querySelector('#host-secret code')?.textContent")
    assert token and token != stack.host_token


@pytest_twisted.ensureDeferred
async def test_errors_read_as_sentences(stack: Stack, browser: Browser,
                                        artifacts: None) -> None:
    sb = stack.sb
    await _user(sb, "ops", admin=True)
    await _user(sb, "bob")
    await _log_in(browser, sb.url, "bob")
    # 403: a user who is not an admin opens the users page by its address.
    await browser.get(f"{sb.url}/#/users")
    assert (await notice(browser)).startswith("Not allowed: ")
    # 404: a job that does not exist (or that bob may not read).
    await browser.get(f"{sb.url}/#/jobs/{uuid.uuid4()}")
    assert (await notice(browser)).startswith("Not found: ")
    # 409: an admin adds a user who exists.
    await _log_in(browser, sb.url, "ops")
    await browser.get(f"{sb.url}/#/users")
    await browser.wait_for("document.querySelector('tr[data-user=\"bob\"]')")
    await browser.type("main form.inline input:not([type])", "bob")
    await browser.click("main form.inline button[type=submit]")
    assert (await notice(browser)).startswith("Conflict: ")
    # 503 (the database away) and an unreachable switchboard, as the page words them.
    worded = await browser.call_async("""
        const done = arguments[arguments.length - 1];
        import("/console/assets/api.js").then((api) => done([
            api.describe(new api.ApiError(503, "unavailable",
                                          "the database is unavailable; try again later")),
            api.describe(new api.ApiError(0, "network", "the switchboard cannot be reached")),
        ]), (e) => done(String(e)));
    """)
    assert worded == ["Unavailable, try again shortly: the database is unavailable; "
                      "try again later", "Error: the switchboard cannot be reached"]


@pytest_twisted.ensureDeferred
async def test_console_follow_scroll_back_and_download(stack: Stack, browser: Browser,
                                                       artifacts: None,
                                                       tmp_path: Path) -> None:
    sb = stack.sb
    alice = await _user(sb, "alice")
    job = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})).body
    await _log_in(browser, sb.url, "alice")
    await browser.downloads_to(tmp_path / "downloads")
    await browser.get(f"{sb.url}/#/jobs/{job['id']}")
    await browser.wait_for("document.querySelector('#console')")
    await browser.script("document.querySelector('#console').scrollIntoView()")
    # Following, the newest line is in view.
    await browser.wait_for("Number(document.querySelector('#console').dataset.baseY) > 50", 30)
    assert await browser.script(
        "const d = document.querySelector('#console').dataset; return d.viewportY === d.baseY")

    # Scrolling back stops following: the lines read stay in view as more arrive.
    await browser.wheel("#console .xterm-screen", -2000)
    assert not await browser.script("return document.querySelector('#follow').checked")
    await browser.wait_for(f"Number({CONSOLE}.viewportY) < Number({CONSOLE}.baseY)")
    line = int(await browser.script("return document.querySelector('#console').dataset.viewportY"))
    bytes_ = int(await browser.script("return document.querySelector('#console').dataset.bytes"))
    await browser.wait_for(f"Number(document.querySelector('#console').dataset.bytes) > "
                           f"{bytes_ + 2000}")
    viewport = await browser.script("return document.querySelector('#console').dataset")
    assert int(viewport["viewportY"]) == line < int(viewport["baseY"])
    # Following again jumps to the end and stays there.
    await browser.click("#follow")
    bytes_ = int(await browser.script("return document.querySelector('#console').dataset.bytes"))
    await browser.wait_for(f"Number({CONSOLE}.bytes) > {bytes_ + 1000} && "
                           f"{CONSOLE}.viewportY === {CONSOLE}.baseY")

    # The full log, downloaded, is the log server's console byte for byte.
    r = await alice.post(f"/api/v1/jobs/{job['id']}/terminate")
    assert r.status == 200, r.body
    await browser.wait_for("document.querySelector('#console-status').textContent"
                           ".includes('console closed')", 30)
    await browser.click("#download")
    saved = tmp_path / "downloads" / f"job-{job['id']}-console.log"

    async def downloaded() -> bool:
        return saved.exists()

    await eventually(downloaded, timeout=20)
    access = (await alice.post(f"/api/v1/jobs/{job['id']}/logs/token")).body
    r = await treq.get(f"{access['servers'][0]}/v1/jobs/{job['id']}/streams/console",
                       headers={"Authorization": f"Bearer {access['token']}"})
    expected = await r.content()
    assert r.code == 200 and len(expected) > bytes_
    assert saved.read_bytes() == expected


@pytest_twisted.ensureDeferred
async def test_my_tokens_secret_shown_once_and_revoked(stack: Stack, browser: Browser,
                                                       artifacts: None) -> None:
    sb = stack.sb
    await _user(sb, "bob")
    await _log_in(browser, sb.url, "bob")
    await browser.get(f"{sb.url}/#/tokens")
    await browser.wait_for("document.querySelector('#token-label')")
    await browser.type("#token-label", "ci <b>runner</b>")
    await browser.type("#token-days", "7")
    await browser.click("main form.inline button[type=submit]")
    secret = await browser.wait_for("document.querySelector('#token-secret')?.textContent")
    r = await treq.get(f"{sb.url}/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
    assert r.code == 200 and (await r.json())["name"] == "bob"
    # The label is text; the row is found by it.
    row = ("[...document.querySelectorAll('#tokens tbody tr')].find("
           "(tr) => tr.firstChild.textContent === 'ci <b>runner</b>')")
    assert await browser.script(f"return {row}.querySelectorAll('b').length") == 0
    # Shown once: the list and a reload never show it again.
    await browser.get("about:blank")
    await browser.get(f"{sb.url}/#/tokens")
    await browser.wait_for(row)
    assert secret not in await browser.script("return document.body.innerHTML")
    # Revoked from the page, it stops working.
    await browser.script(f"{row}.querySelector('button.danger').click()")
    await browser.wait_for(f"{row}.children[4].textContent !== ''")
    r = await treq.get(f"{sb.url}/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
    assert r.code == 401
    await r.content()


@pytest_twisted.ensureDeferred
async def test_snapshot_of_an_ended_job(stack: Stack, browser: Browser,
                                        artifacts: None) -> None:
    """The API snapshots only an ended job that ran on a host: the button is there then
    (with ``manage``), not while the job runs, and the request shows on the page."""
    sb = stack.sb
    ops = await _user(sb, "ops", admin=True)
    store = "http://127.0.0.1:9"  # registered; the mock host uploads nothing
    await sb.register_store(store, "treadmill-imagestore")
    r = await ops.post("/api/v1/images", {"name": "ops/base", "digest": DIGEST,
                                          "stores": [store]})
    assert r.status == 201, r.body
    job = (await ops.post("/api/v1/jobs", {"image": "ops/base", "tags": ["mock"]})).body
    await _log_in(browser, sb.url, "ops")
    await browser.get(f"{sb.url}/#/jobs/{job['id']}")
    await browser.wait_for("['initializing', 'ready'].includes(document.querySelector("
                           "'#job-state [data-state]')?.dataset.state)", 30)
    assert await browser.script("return document.querySelector('#snapshot') === null")
    await browser.click("#cancel")
    await browser.accept_dialog()
    await browser.wait_for("document.querySelector('#snapshot')", 30)
    await browser.click("#snapshot")
    await browser.accept_dialog("ops/snap-1")
    assert await notice(browser) == "Snapshot ops/snap-1 requested."
    state = await browser.wait_for(
        "document.querySelector('#snapshots tr[data-snapshot] .snapshot-state')?.textContent")
    assert state.startswith(("pending", "failed")), state
    listed = (await ops.get(f"/api/v1/jobs/{job['id']}/snapshots")).body["snapshots"]
    assert [s["name"] for s in listed] == ["ops/snap-1"]

    # The images page: the catalogue with its store, and the image's grants.
    await _user(sb, "bob")
    r = await ops.post("/api/v1/images/ops/base/grants", {"user": "bob", "privilege": "use"})
    assert r.status == 201, r.body
    await browser.get(f"{sb.url}/#/images")
    image = 'tr[data-image="ops/base"]'
    await browser.wait_for(f"document.querySelector('{image}')")
    assert store in await browser.script(f"return document.querySelector('{image}').textContent")
    await browser.click(f"{image} button")
    grants = await browser.wait_for("document.querySelector('#image-grants table')?.innerText")
    assert "bob" in grants and "use" in grants, grants
