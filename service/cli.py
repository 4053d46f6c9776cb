"""``lrserve serve`` / ``python -m service``: parse flags, check the bind, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service.config import LOOPBACK_HOSTS, Settings, SettingsError

log = logging.getLogger("lrserve.cli")


def build_parser(prog: str = "lrserve serve") -> argparse.ArgumentParser:
    env = Settings.from_env()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve learning-rate schedules over HTTP. Every flag has an LRSERVE_* "
        "environment variable; flags win.",
    )
    p.add_argument(
        "--host", default=env.host, help="address to bind (LRSERVE_HOST, default 127.0.0.1)"
    )
    p.add_argument("--port", type=int, default=env.port, help="port (LRSERVE_PORT, default 8000)")
    p.add_argument(
        "--database",
        default=env.database,
        help="sqlite:///./lrserve.db (default), sqlite:////abs/path.db or "
        "postgresql://user@host:5432/db (LRSERVE_DATABASE)",
    )
    p.add_argument(
        "--workers", type=int, default=env.workers, help="worker processes (LRSERVE_WORKERS)"
    )
    p.add_argument("--token", default=env.token, help="read-write bearer token (LRSERVE_TOKEN)")
    p.add_argument(
        "--read-token", default=env.read_token, help="read-only bearer token (LRSERVE_READ_TOKEN)"
    )
    p.add_argument(
        "--log-level",
        default=env.log_level,
        choices=["critical", "error", "warning", "info", "debug"],
        help="LRSERVE_LOG_LEVEL (default info: one JSON line per request)",
    )
    p.add_argument(
        "--insecure-bind-all",
        action="store_true",
        default=env.allow_unauthenticated,
        help="serve without a token on a non-loopback address (LRSERVE_ALLOW_UNAUTHENTICATED=1)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=env.max_body_bytes, help="request body limit (413)"
    )
    p.add_argument(
        "--idle-after",
        type=float,
        default=env.idle_after,
        help="seconds without a report or heartbeat after which a run is idle "
        "(LRSERVE_IDLE_AFTER, default 300)",
    )
    return p


def parse_settings(argv: list[str] | None) -> Settings:
    """The settings of ``argv``: its flags over the ``LRSERVE_*`` environment over the
    defaults. Raises :class:`SettingsError` for a variable of the wrong type."""
    args = build_parser().parse_args(argv)
    base = Settings.from_env()
    # model_copy does not validate: argparse has already typed every flag below, and
    # check_settings judges the ranges of the result.
    return base.model_copy(
        update={
            "host": args.host,
            "port": args.port,
            "database": args.database,
            "workers": args.workers,
            "token": args.token or None,
            "read_token": args.read_token or None,
            "log_level": args.log_level,
            "allow_unauthenticated": bool(args.insecure_bind_all),
            "max_body_bytes": args.max_body_bytes,
            "idle_after": args.idle_after,
        }
    )


_AT_LEAST = {
    "cache_bytes": 1 << 20,
    "compile_cache_bytes": 1 << 20,
    "max_request_work": 1 << 16,
    "max_curve_span": 1000,
    "max_json_depth": 8,
    "busy_timeout_ms": 0,
    "pool_min": 1,
    "pool_max": 1,
    "min_free_bytes": 0,
}
"""The least value each of these settings may have (see docs/operations.md)."""


def check_settings(settings: Settings) -> str | None:
    """Why these settings must not start a server, or None."""
    if not 0 <= settings.port <= 65535:
        return f"--port must be 0..65535, not {settings.port}"
    if settings.workers < 1:
        return f"--workers must be at least 1, not {settings.workers}"
    if settings.max_body_bytes < 1024:
        return "--max-body-bytes must be at least 1024"
    if not 0 < settings.idle_after <= 10**7:
        return f"--idle-after must be more than 0 and at most 10000000 s, not {settings.idle_after}"
    if not 1 <= settings.stream_poll_seconds <= 60:
        return "LRSERVE_STREAM_POLL_SECONDS must be 1 to 60 (one point read per connection)"
    if not 0 < settings.stream_keepalive_seconds <= 3600:
        return "LRSERVE_STREAM_KEEPALIVE_SECONDS must be more than 0 and at most 3600"
    for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        value = getattr(settings, name)
        if not 0 < value <= 3600:
            return f"LRSERVE_{name.upper()} must be more than 0 and at most 3600 s, not {value}"
    if settings.max_connections < 0:
        return f"LRSERVE_MAX_CONNECTIONS must be 0 (automatic) or more: {settings.max_connections}"
    # Budgets: below these a cache holds too little to help, a limit refuses ordinary requests.
    for name, low in _AT_LEAST.items():
        value = getattr(settings, name)
        if value < low:
            return f"LRSERVE_{name.upper()} must be at least {low}, not {value}"
    if settings.pool_max < settings.pool_min:
        return (
            f"LRSERVE_POOL_MAX ({settings.pool_max}) must be at least "
            f"LRSERVE_POOL_MIN ({settings.pool_min})"
        )
    if not 0 < settings.wait_poll_seconds <= 60:
        value = settings.wait_poll_seconds
        return f"LRSERVE_WAIT_POLL_SECONDS must be more than 0 and at most 60 s, not {value}"
    if not 0 <= settings.max_wait_seconds <= 300:
        # ?wait= itself is at most 300 s (docs/api.md).
        return f"LRSERVE_MAX_WAIT_SECONDS must be 0 to 300 s, not {settings.max_wait_seconds}"
    if settings.read_token and not settings.token:
        return "--read-token needs --token too (otherwise nobody could write)"
    if (
        not settings.auth_enabled
        and settings.host not in LOOPBACK_HOSTS
        and not settings.allow_unauthenticated
    ):
        return (
            f"refusing to serve without a token on {settings.host}: set --token/LRSERVE_TOKEN, "
            "bind to 127.0.0.1, or pass --insecure-bind-all (LRSERVE_ALLOW_UNAUTHENTICATED=1)"
        )
    try:
        from service.store import open_store

        if settings.database.startswith("sqlite:"):
            open_store(settings.database).close()
        elif not settings.database.startswith(
            ("postgresql://", "postgres://", "postgresql+psycopg://")
        ):
            open_store(settings.database)
    except ValueError as exc:
        return f"--database: {exc}"
    return None


def check_database(settings: Settings) -> str | None:
    """Why the database must not start a server (a fault that waiting cannot cure: an
    unwritable SQLite path, a non-UTF8 PostgreSQL database), or None. A database that cannot
    be reached now is only logged: the server starts and answers 503 until it can."""
    from service.runs.repository import StoreError, StoreFault
    from service.store import preflight

    try:
        preflight(settings.database, settings.busy_timeout_ms)
    except StoreFault as exc:
        return str(exc)
    except StoreError as exc:
        log.warning(
            "database not ready",
            extra={"fields": {"event": "store_unavailable", "detail": str(exc)}},
        )
    return None


def serve_main(argv: list[str] | None = None) -> int:
    """Start the server; returns the process exit status (2 for bad settings)."""
    import uvicorn

    from service.api.observability import configure_logging
    from service.api.protocol import PROTOCOL

    try:
        settings = parse_settings(argv)
    except SettingsError as exc:
        print(f"lrserve serve: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    problem = check_settings(settings)
    if problem is None:
        problem = check_database(settings)
    if problem is not None:
        print(f"lrserve serve: error: {problem}", file=sys.stderr)
        return 2
    if not settings.auth_enabled:
        where = "on loopback only" if settings.host in LOOPBACK_HOSTS else f"on {settings.host}"
        log.warning(
            "unauthenticated",
            extra={
                "fields": {
                    "event": "unauthenticated",
                    "msg": f"no token configured: serving without authentication {where}",
                }
            },
        )
    # Workers are separate processes: hand them the parsed settings via the environment.
    os.environ.update(settings.to_env())
    log.info(
        "starting",
        extra={
            "fields": {
                "event": "starting",
                "host": settings.host,
                "port": settings.port,
                "workers": settings.workers,
                "database": settings.database.split("://", 1)[0],
            }
        },
    )
    uvicorn.run(
        "service.api.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,  # one structured line per request comes from our middleware
        log_config=None,
        server_header=False,
        proxy_headers=False,
        # Read timeouts and a connection cap uvicorn lacks (service/api/protocol.py); the
        # limits travel to the workers in the LRSERVE_* environment set above.
        http=PROTOCOL,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    return 0
