"""``lrserve serve`` / ``python -m service``: parse flags, check the bind, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

from service.config import LOOPBACK_HOSTS, Settings

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
    return p


def parse_settings(argv: list[str] | None) -> Settings:
    args = build_parser().parse_args(argv)
    base = Settings.from_env()
    return replace(
        base,
        host=args.host,
        port=args.port,
        database=args.database,
        workers=args.workers,
        token=args.token or None,
        read_token=args.read_token or None,
        log_level=args.log_level,
        allow_unauthenticated=bool(args.insecure_bind_all),
        max_body_bytes=args.max_body_bytes,
    )


def check_settings(settings: Settings) -> str | None:
    """Why these settings must not start a server, or None."""
    if not 0 <= settings.port <= 65535:
        return f"--port must be 0..65535, not {settings.port}"
    if settings.workers < 1:
        return f"--workers must be at least 1, not {settings.workers}"
    if settings.max_body_bytes < 1024:
        return "--max-body-bytes must be at least 1024"
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


def serve_main(argv: list[str] | None = None) -> int:
    """Start the server; returns the process exit status (2 for bad settings)."""
    import uvicorn

    from service.api.observability import configure_logging

    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    problem = check_settings(settings)
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
    )
    return 0
