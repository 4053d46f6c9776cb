"""Servers shared by a test module: one per dialect, started once (servers cost seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, postgres_database, start_server


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server on a fresh database, shared by the tests of one module, per dialect."""
    tmp: Path = tmp_path_factory.mktemp(f"srv-{request.param}")
    if request.param == "sqlite":
        srv = start_server(tmp, f"sqlite:///{tmp / 'lrserve.db'}")
        try:
            yield srv
        finally:
            srv.stop()
        return
    with postgres_database() as url:
        srv = start_server(tmp, url)
        try:
            yield srv
        finally:
            srv.stop()


# Headless Chromium for the web page's tests (tests/service/browser.py).
from tests.service.browser import browser, browser_server, page  # noqa: E402, F401
