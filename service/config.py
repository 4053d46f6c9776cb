"""Server settings, read from command-line flags and ``LRSERVE_*`` environment variables.

Flags win over the environment, the environment over the defaults. ``serve_main`` hands the
settings to every uvicorn worker through the environment (see :meth:`Settings.to_env`), so a
worker process rebuilds exactly the settings its parent parsed.

The variables are typed by pydantic: each field ``name`` is the variable ``LRSERVE_NAME``
(exactly that case), an empty one counts as unset, integers may use ``_`` separators, numbers
must be finite. Ranges are checked later by ``service.cli.check_settings``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

DEFAULT_DATABASE = "sqlite:///./lrserve.db"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_PREFIX = "LRSERVE_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SECRET = frozenset({"token", "read_token"})


class SettingsError(ValueError):
    """A ``LRSERVE_*`` variable whose value cannot be read (the message names it)."""


def _variable(field: str) -> str:
    """The environment variable of a field: ``port`` is ``LRSERVE_PORT``."""
    return f"{_PREFIX}{field.upper()}"


def _flag(value: object) -> object:
    # The words these flags have always taken (the ones SettingsError lists), blanks around
    # them allowed; pydantic's own bool would also take t/f/y/n and refuse " 1".
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        raise ValueError("not a flag")
    return value


_Flag = Annotated[bool, BeforeValidator(_flag)]
"""A bool that a variable spells 1/0, true/false, yes/no or on/off (any case)."""


def _explain(exc: ValidationError) -> str:
    """The messages of a failed :meth:`Settings.from_env`, one per bad variable."""
    out = []
    for error in exc.errors():
        field, raw = str(error["loc"][0]), error["input"]
        name = _variable(field)
        kind = Settings.model_fields[field].annotation if field in Settings.model_fields else None
        if kind is bool:
            out.append(f"{name} must be one of 1/0, true/false, yes/no, on/off: {raw!r}")
        elif kind is int:
            out.append(f"{name} must be an integer, not {raw!r}")
        elif kind is float:
            out.append(f"{name} must be a number, not {raw!r}")
        else:
            out.append(f"{name}: {error['msg']}, not {raw!r}")
    return "; ".join(out)


class Settings(BaseModel):
    """Everything the server needs to start; immutable once parsed.

    ``Settings(port=...)`` validates the values it is given and reads no environment (only
    :meth:`from_env` does); a change is a copy, ``settings.model_copy(update={...})``.
    """

    model_config = ConfigDict(
        allow_inf_nan=False,  # LRSERVE_IDLE_AFTER=inf would be a timeout that never fires
        frozen=True,
        extra="forbid",
    )

    host: str = "127.0.0.1"
    port: int = 8000
    database: str = DEFAULT_DATABASE
    workers: int = 1
    token: str | None = None
    read_token: str | None = None
    log_level: str = "info"
    allow_unauthenticated: _Flag = False
    """Serve without a token on a non-loopback address (``--insecure-bind-all``)."""
    max_body_bytes: int = 1_048_576
    max_json_depth: int = 64
    max_curve_span: int = 10_000_000
    max_request_work: int = 1 << 29
    """The work budget of one request (``service.schedules.cost.WORK_BUDGET``; see
    docs/operations.md, "Request limits and the work budget")."""
    max_wait_seconds: float = 300.0
    busy_timeout_ms: int = 5_000
    pool_min: int = 1
    pool_max: int = 10
    min_free_bytes: int = 33_554_432
    """SQLite: ``/readyz`` answers 503 while the database's file system has less free."""
    wait_poll_seconds: float = 0.02
    """How often a ``?wait=`` request looks at the database for the step's completion."""
    idle_after: float = 300.0
    """Seconds without a report or heartbeat after which a run's status is ``idle``."""
    stream_poll_seconds: float = 1.0
    """How often a ``GET .../stream`` connection reads the run's version (1 s or slower)."""
    stream_keepalive_seconds: float = 15.0
    """Seconds between ``: keep-alive`` comments on an idle ``GET .../stream``."""
    header_timeout: float = 10.0
    """Seconds a connection may take to send a request head (see service/api/protocol.py)."""
    body_timeout: float = 30.0
    """Seconds a request may take to send its body once its head arrived (then 408)."""
    keep_alive_timeout: int = 5
    """Seconds an idle keep-alive connection stays open (uvicorn's ``timeout_keep_alive``)."""
    max_connections: int = 0
    """Open connections per process; 0: three quarters of the soft ``RLIMIT_NOFILE``."""
    cache_bytes: int = 64 * 1024 * 1024
    """Budget of the evaluated-values cache per process (least recently used out by bytes)."""
    compile_cache_bytes: int = 48 * 1024 * 1024
    """Budget of the compiled-schedule cache per process (estimated bytes, LRU)."""

    @property
    def auth_enabled(self) -> bool:
        """Whether ``/v1`` needs a bearer token (a read-write or a read-only one is set)."""
        return bool(self.token or self.read_token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``LRSERVE_*`` variables (``os.environ`` if ``env`` is None); unset
        or empty ones keep their defaults.

        Raises :class:`SettingsError`, naming the variable, for a value of the wrong type
        (ranges are checked by ``service.cli.check_settings``).
        """
        env = os.environ if env is None else env
        # Exactly LRSERVE_<FIELD>; an empty one (docker-compose.yml passes LRSERVE_READ_TOKEN=
        # when none is set) counts as unset.
        values = {
            name: env[_variable(name)] for name in cls.model_fields if env.get(_variable(name))
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            # pydantic's own message would print every input; ours names the variable.
            raise SettingsError(_explain(exc)) from None

    def to_env(self) -> dict[str, str]:
        """The ``LRSERVE_*`` variables that make :meth:`from_env` return these settings."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            out[_variable(name)] = str(value)
        return out

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() both come from here: tokens must never reach a log line or a
        # traceback.
        for name, value in super().__repr_args__():
            yield name, "***" if name in _SECRET and value else value
