"""docs/api.md, the wire contract, kept in step with the server.

- every operation of ``create_app().openapi()`` has a ``### METHOD /path`` heading;
- every heading names a route the app serves (in the schema or not);
- every problem type slug the service code can send is in the problem-type table, and every
  slug in the table is one the code sends.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.routing import Match

from service.api import problems
from service.api.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "api.md"
METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS")
HEADING = re.compile(rf"^###\s+({'|'.join(METHODS)})\s+(/\S*)\s*$", re.M)
# How the service code names a problem it sends: a slug followed by its title, as in
# problem_response(503, "not-ready", "Not ready", ...), ApiError(...), or a (status, slug,
# title) / (slug, title) table entry; or a "/problems/<slug>" literal.
SENT_SLUG = re.compile(r"(?:\(|\d+,)\s*\"([a-z][a-z0-9]*(?:-[a-z0-9]+)*)\",\s*f?\"[A-Z]")
LITERAL_SLUG = re.compile(r"[\"']/problems/([a-z][a-z0-9-]*)[\"']")
TABLE_SLUG = re.compile(r"^\|\s*`([a-z][a-z0-9-]*)`\s*\|", re.M)


@pytest.fixture(scope="module")
def app() -> FastAPI:
    # The store opens in the lifespan only, which never runs here: nothing touches a database.
    return create_app(Settings(database="sqlite:///:memory:"))


def _doc() -> str:
    return API_DOC.read_text()


def documented() -> set[tuple[str, str]]:
    """(METHOD, path) of every endpoint heading in docs/api.md."""
    return {(m, p) for m, p in HEADING.findall(_doc())}


def _concrete(path: str) -> str:
    """A path the template matches: ``{n}`` becomes 1, any other parameter a plain name."""
    return re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1) == "n" else "doc-check", path)


def is_served(app: FastAPI, method: str, path: str) -> bool:
    """Whether the app routes ``method path`` to an endpoint (in the schema or not)."""
    # Starlette's own matching, so that routers FastAPI includes lazily count as well.
    scope = {"type": "http", "method": method, "path": _concrete(path), "root_path": ""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def in_openapi(app: FastAPI) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        for method in ops
        if method.upper() in METHODS
    }


def test_every_openapi_operation_is_documented(app: FastAPI) -> None:
    missing = sorted(in_openapi(app) - documented())
    assert not missing, (
        f"docs/api.md has no '### METHOD /path' heading for {missing}: document them there"
    )


def test_every_documented_endpoint_exists(app: FastAPI) -> None:
    stale = sorted((m, p) for m, p in documented() if not is_served(app, m, p))
    assert not stale, f"docs/api.md documents endpoints the server does not have: {stale}"


def test_every_heading_is_documented_once() -> None:
    headings = HEADING.findall(_doc())
    dupes = sorted({h for h in headings if headings.count(h) > 1})
    assert not dupes, f"docs/api.md documents these endpoints twice: {dupes}"


def sent_slugs() -> set[str]:
    """Every problem slug the service code can send."""
    slugs = {slug for slug, _ in problems._STATUS_SLUG.values()}
    slugs |= {slug for _, slug, _ in problems._RUN_ERRORS.values()}
    # (service/api/problems.py's default slugs are found by the pattern, like every other.)
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        slugs |= set(SENT_SLUG.findall(text)) | set(LITERAL_SLUG.findall(text))
    return slugs


def documented_slugs() -> set[str]:
    section = _doc().split("## Problem types", 1)
    assert len(section) == 2, "docs/api.md has no '## Problem types' section"
    return set(TABLE_SLUG.findall(section[1])) - {"slug"}


def test_every_problem_type_is_documented() -> None:
    sent = sent_slugs()
    assert {"validation-error", "run-not-found", "too-late", "database-busy"} <= sent
    missing = sorted(sent - documented_slugs())
    assert not missing, f"problem types sent by the code but not in docs/api.md: {missing}"


def test_every_documented_problem_type_is_sent() -> None:
    stale = sorted(documented_slugs() - sent_slugs())
    assert not stale, f"docs/api.md lists problem types the code never sends: {stale}"


def test_docs_point_at_the_contract_inside_the_repository() -> None:
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "shared/API.md" not in path.read_text(), (
            f"{path.relative_to(ROOT)} links to shared/API.md, outside the repository: "
            "link docs/api.md"
        )
