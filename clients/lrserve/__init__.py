"""lrserve: the Python SDK of the lrserve learning-rate schedule service.

>>> import lrserve
>>> client = lrserve.Client()            # $LRSERVE_URL / $LRSERVE_TOKEN, or arguments
>>> client.get_lr("exp-42", step=100)    # doctest: +SKIP

Importing ``lrserve`` needs only httpx; the PyTorch integration is ``lrserve.torch``,
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._async_client import AsyncClient
from ._client import Client
from ._config import DEFAULT_URL
from ._errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    LRServeError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ReportConflictError,
    RewindConflictError,
    RunConflictError,
    RunNotFoundError,
    ServerError,
    ServiceUnavailableError,
    StaleReportError,
    TooLateError,
    TransportError,
    UsageError,
    ValidationError,
)
from ._transport import RetryPolicy
from ._types import (
    CreateRunResult,
    Curve,
    Decision,
    Event,
    EventList,
    GroupSpec,
    LRValues,
    LRWindow,
    MetricHistory,
    MetricNames,
    MetricPoint,
    Preview,
    ReportResult,
    Run,
    RunList,
    RunSpec,
    RunSummary,
)
from ._version import __version__

__all__ = [
    "DEFAULT_URL",
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "CreateRunResult",
    "Curve",
    "Decision",
    "Event",
    "EventList",
    "GroupSpec",
    "LRServeError",
    "LRValues",
    "LRWindow",
    "MetricHistory",
    "MetricNames",
    "MetricPoint",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Preview",
    "ReportConflictError",
    "ReportResult",
    "RetryPolicy",
    "RewindConflictError",
    "Run",
    "RunConflictError",
    "RunList",
    "RunNotFoundError",
    "RunSpec",
    "RunSummary",
    "ServerError",
    "ServiceUnavailableError",
    "StaleReportError",
    "TooLateError",
    "TransportError",
    "UsageError",
    "ValidationError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # `lrserve.torch` imports torch, which takes seconds: load it only when asked for.
    if name == "torch":
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
