"""``/docs`` and ``/redoc`` render in headless Chromium with every request outside the
server refused: their assets ship with the package (service/api/static/vendor/)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from tests.conftest import ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route


def _offline(page: Page, server: ServerProcess) -> list[str]:
    """Abort every request that is not for the server; the list of those attempted."""
    host = urlsplit(server.url).netloc
    attempted: list[str] = []

    def route(r: Route) -> None:
        url = r.request.url
        if urlsplit(url).netloc == host or url.startswith("data:"):
            r.continue_()
        else:
            attempted.append(url)
            r.abort()

    page.route("**/*", route)
    return attempted


def test_swagger_ui_renders_offline(live_server: ServerProcess, page: Page) -> None:
    attempted = _offline(page, live_server)
    failed: list[Any] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(f"{live_server.url}/docs")
    # Swagger UI lists the operations it read from /openapi.json.
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/v1/runs/{run_id}/stream" in p for p in paths), paths[:5]
    assert any(p.strip() == "/v1/runs" for p in paths), paths[:5]
    assert len(paths) >= 20
    assert attempted == [] and failed == []


def test_redoc_loads_offline(live_server: ServerProcess, page: Page) -> None:
    attempted = _offline(page, live_server)
    # ReDoc's bundle is served here, runs, and fetches the schema from here (its own
    # request: the page names the schema only in an attribute). Rendering this schema, with
    # its recursive union of every schedule node, keeps ReDoc busy for about a minute on a
    # loaded machine, so the test stops once the bundle has the schema.
    with page.expect_response(lambda r: r.url.endswith("/openapi.json"), timeout=60_000) as spec:
        page.goto(f"{live_server.url}/redoc", wait_until="commit")
    assert spec.value.status == 200
    assert attempted == []


def test_the_pages_name_only_local_assets(live_server: ServerProcess) -> None:
    for path in ("/docs", "/redoc"):
        html = httpx.get(f"{live_server.url}{path}").text
        assert "http://" not in html.replace(live_server.url, "") and "https://" not in html
        for asset in ("/static/vendor/",):
            assert asset in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = httpx.get(f"{live_server.url}/static/vendor/{asset}")
        assert r.status_code == 200 and len(r.content) > 100_000
