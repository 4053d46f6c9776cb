"""Schemathesis against the server's own OpenAPI document (issue 14, item 7).

Every phase: ``examples``, ``coverage`` (boundary and negative values derived from the
schema, unexpected methods), ``fuzzing`` (hypothesis) and ``stateful`` (chains of calls that
follow the links schemathesis infers: create a run, then read, report, override, delete it),
on an app without auth (every phase) and on one with a token (fuzzing with it and without
it; the stateful phase with it), then the stateful phase over a real uvicorn. The checks:

- ``not_a_server_error``: no 5xx, whatever the input;
- ``status_code_conformance``: every status is documented for its operation;
- ``content_type_conformance``: every answer has its documented media type;
- ``response_schema_conformance``: every answer's body fits its documented schema;
- ``response_headers_conformance``, ``negative_data_rejection`` (input that violates the
  schema is refused with a 4xx), ``unsupported_method`` / ``allow_header_conformance`` (405
  with a complete ``Allow``; this one found that a 405 named one method only),
  ``use_after_free`` (a deleted run stays gone) and the rest of schemathesis's defaults,
  except where noted below (``EXCLUDED_CHECKS``, ``SPEC_BODIES``).

The app runs in-process over ASGI (fast: no sockets), on a real SQLite file; one short run
over a real uvicorn checks that the HTTP server itself adds no surprise. Draws are
deterministic (``derandomize``), so CI cannot fail on an example nobody has seen; the
``LRSERVE_SCHEMATHESIS_EXAMPLES`` variable raises the counts for a longer run by hand.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from service.api.app import create_app
from service.config import Settings
from tests.conftest import ServerProcess

TOKEN = "st-write-token"
READ_TOKEN = "st-read-token"
MAX_EXAMPLES = int(os.environ.get("LRSERVE_SCHEMATHESIS_EXAMPLES", "3"))
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# Excluded checks, each a false positive for this API:
# - positive_data_acceptance: expects every schema-valid request to be accepted, but some
#   rules span several fields and OpenAPI cannot state them (`count` needs `start` on
#   GET .../lr; a `group_schedules` key must name a group; a ?wait= on a run that does not
#   exist is a 404...): those get a 422 or 404 with a problem saying why, which is right.
EXCLUDED_CHECKS = ("positive_data_acceptance",)
# Operations whose body holds a schedule spec (a union of some 50 node types, nested): the
# examples and coverage phases build their cases from every combination of the nested
# schemas up front and did not finish in 10 minutes; fuzzing and the stateful phase (which
# creates runs through PUT) cover them.
SPEC_BODIES = (
    ("PUT", "/v1/runs/{run_id}"),
    ("POST", "/v1/schedules/preview"),
    ("POST", "/v1/runs/{run_id}/amendments"),
)


def _config(
    headers: dict[str, str], fuzzing_only: bool = False, base_url: str | None = None
) -> SchemathesisConfig:
    phases: dict[str, Any] = {"stateful": {"max-steps": 6}}
    if fuzzing_only:
        phases |= {"examples": {"enabled": False}, "coverage": {"enabled": False}}
    return SchemathesisConfig.from_dict(
        {
            "headers": headers,
            **({"base-url": base_url} if base_url else {}),
            "phases": phases,
            "generation": {"max-examples": MAX_EXAMPLES},
            "checks": {name: {"enabled": False} for name in EXCLUDED_CHECKS},
            "operations": [
                {
                    "include-method": method,
                    "include-path": path,
                    "phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}},
                }
                for method, path in SPEC_BODIES
            ]
            # Server-sent events: on an existing run the answer never ends (a client reads it
            # as it comes); tests/service/test_stream.py covers it over uvicorn.
            + [{"include-path": "/v1/runs/{run_id}/stream", "enabled": False}],
        }
    )


# Built at import (schemathesis's lazy fixture loader does not work with pytest 9), from the
# app's own document; the app (and its SQLite file) starts with the first case.
_TMP = tempfile.TemporaryDirectory(prefix="lrserve-schemathesis-")


def _schema(name: str, token: bool, headers: dict[str, str], fuzzing_only: bool = False) -> Any:
    database = Path(_TMP.name) / f"{name}.db"
    app = create_app(
        Settings(
            database=f"sqlite:///{database}",
            token=TOKEN if token else None,
            read_token=READ_TOKEN if token else None,
            # A generated ?wait= on a run of many ranks would hold its case for 300 s.
            max_wait_seconds=0.2,
        )
    )
    schema = schemathesis.openapi.from_dict(app.openapi(), config=_config(headers, fuzzing_only))
    schema.app = app
    schema.location = "/openapi.json"
    return schema


open_api = _schema("open", False, {})
# With the token the routes behave as without auth (the coverage phase ran there): fuzz them.
token_api = _schema("token", True, {"Authorization": f"Bearer {TOKEN}"}, fuzzing_only=True)
# Without the token every /v1 answer is the same 401, so fuzzing alone (few cases) checks it.
anonymous_api = _schema("anonymous", True, {}, fuzzing_only=True)


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    _TMP.cleanup()


@open_api.parametrize()
@SETTINGS
def test_without_auth(case: Any) -> None:
    case.call_and_validate()


@token_api.parametrize()
@SETTINGS
def test_with_token(case: Any) -> None:
    case.call_and_validate()


@anonymous_api.parametrize()
@settings(SETTINGS, max_examples=2)
def test_without_the_token(case: Any) -> None:
    case.call_and_validate()


STATEFUL = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def test_stateful_without_auth() -> None:
    open_api.as_state_machine().run(settings=STATEFUL)


def test_stateful_with_token() -> None:
    token_api.as_state_machine().run(settings=STATEFUL)


def test_stateful_over_uvicorn(server_factory: Callable[..., ServerProcess]) -> None:
    """The same state machine over a real uvicorn (``python -m service``): the HTTP server
    itself (its protocol class, keep-alive, chunking) adds no answer the document lacks."""
    server = server_factory(env={"LRSERVE_MAX_WAIT_SECONDS": "0.2"})
    app = create_app(Settings(database="sqlite:///:memory:"))  # (only for its document)
    schema = schemathesis.openapi.from_dict(app.openapi(), config=_config({}, base_url=server.url))
    schema.as_state_machine().run(settings=settings(STATEFUL, max_examples=2))
