"""Helpers shared by the routers: path types, JSON answers, hand-read parameters, hot routes."""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, to_json
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from service.api.problems import ApiError, validation_error

M = TypeVar("M", bound=BaseModel)
Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
RunId = Annotated[
    str,
    Path(
        pattern=RUN_ID_PATTERN,
        description="client-chosen id: [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
        examples=["exp-42"],
    ),
]


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.

    Strict JSON has no literal for them; this is the wire encoding API clients decode.
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def json_bytes(body: Any) -> bytes:
    """Strict JSON (non-finite floats as "NaN"/"Infinity"/"-Infinity" strings).

    pydantic-core writes it (several times faster than the stdlib encoder, which matters on
    the hot paths and for 100,000-step windows); anything it cannot encode goes the stdlib way.
    """
    try:
        return to_json(body, inf_nan_mode="strings")
    except PydanticSerializationError:
        return json.dumps(jsonable(body), allow_nan=False, separators=(",", ":")).encode()


_PIECE = 1 << 12
"""Values per encoded piece of a long series (see :func:`json_with_groups`)."""


def _series_json(values: Any) -> bytes:
    seq = values.tolist() if hasattr(values, "tolist") else values
    if len(seq) <= _PIECE:
        return json_bytes(seq)
    pieces = [json_bytes(seq[i : i + _PIECE])[1:-1] for i in range(0, len(seq), _PIECE)]
    return b"[" + b",".join(pieces) + b"]"


def json_with_groups(answer: Mapping[str, Any]) -> bytes:
    """``json_bytes(answer)`` for an answer whose last member is ``groups`` (group -> field
    -> series, numpy arrays or lists), encoded a series piece at a time.

    One ``to_json`` call over two million values holds the GIL for half a second; pieces of
    4,096 values hold it for about a millisecond each, so the event loop runs in between
    while a worker thread encodes a large window, curve or preview.
    """
    head = json_bytes({k: v for k, v in answer.items() if k != "groups"})
    groups = []
    for name, fields in answer["groups"].items():
        inner = b",".join(json_bytes(f) + b":" + _series_json(v) for f, v in fields.items())
        groups.append(json_bytes(name) + b":{" + inner + b"}")
    sep = b"," if len(head) > 2 else b""
    return head[:-1] + sep + b'"groups":{' + b",".join(groups) + b"}}"


LARGE_ANSWER_VALUES = 1 << 16
"""Answers with more values than this are encoded in a worker thread (piece by piece)."""


def json_response(
    body: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    if status_code == 200 and headers is None:
        return JsonBytesResponse(json_bytes(body))
    return Response(
        json_bytes(body), status_code=status_code, media_type="application/json", headers=headers
    )


class JsonBytesResponse(Response):
    """A 200 ``application/json`` answer from ready bytes, its raw headers built directly
    (Starlette's generic header handling costs more than the rest of building the answer)."""

    media_type = "application/json"

    def __init__(self, body: bytes, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [
            (b"content-length", b"%d" % len(body)),
            (b"content-type", b"application/json"),
        ]
        if extra_headers:
            self.raw_headers.extend(extra_headers)


def etag(version: int, created_at: str = "") -> str:
    """The entity tag of a run's values: its version, and (when given) a tag of its creation
    time, so that a run deleted and created again under the same id (versions restart at 1)
    never matches a tag of the old one."""
    if not created_at:
        return f'"{version}"'
    return f'"{version}-{zlib.crc32(created_at.encode()):08x}"'


def etag_matches(if_none_match: str | None, version: int, created_at: str = "") -> bool:
    if not if_none_match:
        return False
    tag = etag(version, created_at)
    for candidate in if_none_match.split(","):
        c = candidate.strip()
        if c == "*" or c == tag or c.removeprefix("W/") == tag:
            return True
    return False


_RUN_ID = re.compile(RUN_ID_PATTERN)


def path_run_id(request: Request) -> str:
    """The ``run_id`` path parameter, checked by hand (hot paths skip FastAPI's params)."""
    run_id: str = request.path_params["run_id"]
    if not _RUN_ID.fullmatch(run_id):  # (match would let "id\n" through: "$" matches before it)
        raise validation_error(["path", "run_id"], f"must match {RUN_ID_PATTERN}")
    return run_id


def query_number(request: Request, name: str, low: float, high: float) -> float | None:
    """A numeric query parameter in ``[low, high]``, or None when absent."""
    if not request.scope["query_string"]:
        return None  # the common case: no query to parse at all
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also refuses nan
        raise validation_error(["query", name], f"must be a number between {low:g} and {high:g}")
    return value


async def refuse_repeated_query(request: Request) -> None:
    """A 422 when a single-valued query parameter is given more than once.

    Starlette keeps the last of repeated values, so ``?step=1&step=9`` would quietly mean
    step 9 and ``?q=a&q=b`` search for ``b``; the client meant something else. Which
    parameters take a list (``status``, ``tag``) the operation's OpenAPI entry says. Every
    route calls it (a dependency of the documented routes; :class:`HotRoute` by hand).
    """
    if not request.scope["query_string"]:
        return  # the common case: nothing to parse
    params = request.query_params
    items = params.multi_items()
    if len(items) == len(params):
        return  # no key given twice: nothing to look up
    single = _single_valued(request)
    seen: set[str] = set()
    for key, _ in items:
        if key in seen and key in single:
            raise validation_error(["query", key], "takes one value: give it once, not repeated")
        seen.add(key)


def _single_valued(request: Request) -> frozenset[str]:
    """The query parameters of the request's operation that are not arrays (its OpenAPI
    entry, which the app builds once and keeps)."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    document = request.app.openapi()
    operation = document.get("paths", {}).get(path, {}).get(request.method.lower(), {})
    names = set()
    for parameter in operation.get("parameters", ()):
        schema = parameter.get("schema", {})
        kinds = [schema, *schema.get("anyOf", ())]
        if parameter.get("in") == "query" and all(k.get("type") != "array" for k in kinds):
            names.add(parameter["name"])
    return frozenset(names)


def param_doc(name: str, where: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI parameter (for endpoints that read their parameters by hand)."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
    }


async def parse_json_body(request: Request, model: type[M]) -> M:
    """The body validated by pydantic-core straight from bytes (the hot write path).

    Errors are the same 422 problem as FastAPI's own body validation, locations under
    ``body``.
    """
    content_type = request.headers.get("content-type")
    if content_type is not None and "json" not in content_type.lower():
        raise ApiError(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "the body must be JSON: send it with Content-Type: application/json, "
            f"not {content_type[:100]!r}",
        )
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [
            {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        raise RequestValidationError(errors) from None


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the endpoint parses itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def hot(endpoint: Endpoint) -> Endpoint:
    """Mark a documented route's endpoint as a hot path (see :class:`HotRoute`).

    The endpoint is declared once, with FastAPI's decorator (its OpenAPI entry, response
    model and errors); ``create_app`` puts a :class:`HotRoute` for every marked endpoint in
    front of the routes, with the same auth function.
    """
    endpoint.__dict__["lrserve_hot"] = True
    return endpoint


def is_hot(endpoint: Callable[..., Any]) -> bool:
    return bool(getattr(endpoint, "lrserve_hot", False))


class HotRoute(Route):
    """A plain Starlette route in front of a documented FastAPI route, for the hot paths.

    ``GET .../lr`` and ``POST .../metrics`` read their parameters and body by hand, so
    FastAPI's per-route machinery (dependency solving, a sub-response, two exit stacks)
    only costs time: about 20 µs a request. This route calls the same
    endpoint without it, behind the same middleware and exception handlers (so errors are
    the same problem+json). ``guard`` runs first (the bearer-token check when auth is on:
    the same function the documented routes' dependency calls). The FastAPI route stays
    registered behind it, so OpenAPI documents the endpoint from its one declaration.
    """

    def __init__(
        self,
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
        method: str,
        guard: Callable[[Request], None] | None = None,
    ) -> None:
        async def handler(request: Request) -> Response:
            if guard is not None:
                guard(request)
            await refuse_repeated_query(request)
            return await endpoint(request)

        super().__init__(path, handler, methods=[method], name=endpoint.__name__)
        self.methods = {method}  # as the FastAPI route: no implicit HEAD

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            # The route template labels metrics and the access log (as FastAPI's routes do).
            child_scope["route"] = self
        return match, child_scope
