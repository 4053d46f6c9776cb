"""Server settings, read from command-line flags and ``LRSERVE_*`` environment variables.

Flags win over the environment, the environment over the defaults. ``serve_main`` hands the
settings to every uvicorn worker through the environment (see :meth:`Settings.to_env`), so a
worker process rebuilds exactly the settings its parent parsed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

DEFAULT_DATABASE = "sqlite:///./lrserve.db"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """A ``LRSERVE_*`` variable whose value cannot be read (the message names it)."""


def _env_bool(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


def _parse(name: str, raw: str, default: object) -> object:
    """``raw`` as the type of ``default``, or a :class:`SettingsError` naming ``name``."""
    text = raw.strip()
    if isinstance(default, bool):
        if text.lower() not in _TRUE | _FALSE:
            raise SettingsError(f"{name} must be one of 1/0, true/false, yes/no, on/off: {raw!r}")
        return text.lower() in _TRUE
    try:
        if isinstance(default, int):
            return int(text.replace("_", ""))
        if isinstance(default, float):
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(text)
            return value
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise SettingsError(f"{name} must be {kind}, not {raw!r}") from None
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start; immutable once parsed."""

    host: str = "127.0.0.1"
    port: int = 8000
    database: str = DEFAULT_DATABASE
    workers: int = 1
    token: str | None = None
    read_token: str | None = None
    log_level: str = "info"
    allow_unauthenticated: bool = False
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
        return bool(self.token or self.read_token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``LRSERVE_*`` variables (unset ones keep their defaults).

        Raises :class:`SettingsError`, naming the variable, for a value of the wrong type
        (ranges are checked by ``service.cli.check_settings``).
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f"LRSERVE_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(name, raw, f.default)
        # The documented name of the escape hatch for unauthenticated non-loopback binds.
        if _env_bool(env.get("LRSERVE_ALLOW_UNAUTHENTICATED")):
            values["allow_unauthenticated"] = True
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The ``LRSERVE_*`` variables that make :meth:`from_env` return these settings."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            out[f"LRSERVE_{f.name.upper()}"] = str(value)
        return out

    def __repr__(self) -> str:
        # Tokens must never reach a log line or a traceback.
        shown = {
            f.name: (
                "***"
                if f.name in {"token", "read_token"} and getattr(self, f.name)
                else getattr(self, f.name)
            )
            for f in fields(self)
        }
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
