"""A headless Debian Chromium driven by Selenium, for the web console's tests.

Selenium's calls block, and the daemons under test run on this process's
reactor: every browser call goes through :meth:`Browser.run` (a thread), so the
reactor keeps serving while the browser waits.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
T = TypeVar("T")


def available() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (tools/setup-env installs it)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            return f"{path} is missing (tools/setup-env installs chromium and chromium-driver)"
    return None


def start_driver() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class Browser:
    """One Chromium for a module; tests use it through ``await browser.run(...)``."""

    def __init__(self, driver: Any):
        self.driver = driver

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await deferToThreadPool(reactor, reactor.getThreadPool(), call, *args)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def call_async(self, source: str, *args: Any) -> Any:
        """Run an async script: ``source`` ends by calling ``arguments[arguments.length-1]``."""
        return await self.run(self.driver.execute_async_script, source, *args)

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def wait_for(self, source: str, timeout: float = 20.0, *args: Any) -> Any:
        """Wait until the JavaScript expression ``source`` is truthy; return its value.
        A script error (an element the page has not rendered yet, or re-renders) counts
        as not yet; the last one is in the message if the wait times out."""
        from selenium.common.exceptions import JavascriptException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        errors: list[str] = []

        def probe(driver: Any) -> Any:
            try:
                return driver.execute_script(f"return ({source});", *args)
            except JavascriptException as e:
                errors[:] = [e.msg or str(e)]
                return False

        def wait() -> Any:
            try:
                return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(probe)
            except TimeoutException:
                error = f" (last script error: {errors[0]})" if errors else ""
                raise AssertionError(f"waited {timeout} s for: {source}{error}") from None

        return await self.run(wait)

    async def type(self, selector: str, text: str, clear: bool = True) -> None:
        from selenium.webdriver.common.by import By

        def act() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, selector)
            if clear:
                element.clear()
            element.send_keys(text)

        await self.run(act)

    async def click(self, selector: str) -> None:
        from selenium.webdriver.common.by import By

        await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, selector).click())

    async def accept_dialog(self, answer: str | None = None) -> None:
        """Accept the page's ``confirm`` (or ``prompt``, answering ``answer``)."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        def accept() -> None:
            WebDriverWait(self.driver, 5).until(expected_conditions.alert_is_present())
            alert = self.driver.switch_to.alert
            if answer is not None:
                alert.send_keys(answer)
            alert.accept()

        await self.run(accept)

    async def wheel(self, selector: str, delta_y: int) -> None:
        """Turn the mouse wheel over an element (negative: scroll up)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
        from selenium.webdriver.common.by import By

        def act() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, selector)
            ActionChains(self.driver).scroll_from_origin(
                ScrollOrigin.from_element(element), 0, delta_y).perform()

        await self.run(act)

    async def downloads_to(self, where: Path) -> None:
        """Save the page's downloads into ``where``, without asking."""
        where.mkdir(parents=True, exist_ok=True)
        await self.run(self.driver.execute_cdp_cmd, "Browser.setDownloadBehavior",
                       {"behavior": "allow", "downloadPath": str(where)})

    async def reset(self) -> None:
        """A fresh start: no cookies, no page."""
        await self.run(self.driver.delete_all_cookies)
        await self.get("about:blank")

    async def snap(self, name: str) -> None:
        """With ``TREADMILL_CONSOLE_SCREENSHOTS=DIR``, a screenshot ``DIR/NAME.png`` of the
        page (how docs/console.md's images are made); otherwise nothing."""
        where = os.environ.get("TREADMILL_CONSOLE_SCREENSHOTS")
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
            await self.run(self.driver.save_screenshot, str(Path(where) / f"{name}.png"))

    def keep_artifacts(self, where: Path, name: str) -> None:
        """A screenshot, the page's HTML and its console log, for a failed test."""
        where.mkdir(parents=True, exist_ok=True)
        try:
            self.driver.save_screenshot(str(where / f"{name}.png"))
            (where / f"{name}.html").write_text(self.driver.page_source)
            (where / f"{name}.console.txt").write_text("\n".join(
                str(entry) for entry in self.driver.get_log("browser")))
        except Exception as e:  # the browser itself may be what failed
            (where / f"{name}.error.txt").write_text(repr(e))
