"""The web console's tests: one headless Chromium per module, and artifacts of failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.web.browser import Browser, start_driver


@pytest.fixture(scope="module")
def browser() -> Any:
    driver = start_driver()
    yield Browser(driver)
    driver.quit()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, browser: Browser, tmp_path: Path) -> Any:
    """Keeps a screenshot, the HTML and the browser's log of a failed test under
    ``tmp_path/browser/``."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        browser.keep_artifacts(tmp_path / "browser", request.node.name)
        print(f"browser artifacts kept in {tmp_path / 'browser'}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    outcome = yield
    if call.when == "call":
        item.rep_call = outcome.get_result()
