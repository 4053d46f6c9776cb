"""Headless Chromium for the web page's tests, driven by Playwright (Debian's chromium, no
browser download).

- ``browser``: one Chromium per test module (a launch costs about a second; a module's tests
  share it, each in its own context, so cookies and storage do not leak between tests).
- ``page``: a fresh 1400x1000 page; JavaScript errors on it fail the test at teardown.
- ``browser_server``: one live server (SQLite) per module, for tests that make their own runs
  (server starts cost seconds: the browser tests share one instead of one each).

Skips when Playwright or ``/usr/bin/chromium`` is missing (fails instead when ``CI=true``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import ServerProcess, start_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = (
    os.environ.get("LRSERVE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium for the tests of one module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - the dev extra installs it
        _unavailable("playwright is not installed")
    if not os.path.exists(CHROMIUM):
        _unavailable(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A live server on a fresh SQLite file, shared by the tests of one module."""
    tmp = tmp_path_factory.mktemp("browser-server")
    srv = start_server(tmp, f"sqlite:///{tmp / 'lrserve.db'}")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A 1400x1000 page in a fresh context; an uncaught page error fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    errors: list[Any] = []
    tab.on("pageerror", lambda error: errors.append(error))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def chart_info(tab: Page) -> dict[str, Any]:
    """What each chart on the page holds (the page's ``lrserveChartInfo()``)."""
    info: dict[str, Any] = tab.evaluate("window.lrserveChartInfo()")
    return info


def wait_for_charts(tab: Page, *keys: str) -> dict[str, Any]:
    """Wait until the charts ``keys`` are drawn; their :func:`chart_info`."""
    tab.wait_for_function(
        "(keys) => window.lrserveChartInfo && keys.every((k) => k in window.lrserveChartInfo())",
        arg=list(keys),
    )
    return chart_info(tab)
