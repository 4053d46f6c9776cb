"""SQLite and PostgreSQL implementations of the run layer's repository
(:class:`service.runs.repository.Store`): the run layer owns the protocol, this package
implements it."""

from __future__ import annotations

from service.runs.repository import Store


def open_store(
    url: str, busy_timeout_ms: int = 5000, pool_min: int = 1, pool_max: int = 10
) -> Store:
    """The store for a database URL (``sqlite:///...`` or ``postgresql://...``)."""
    if url.startswith("sqlite:"):
        from service.store.sqlite import SqliteStore

        return SqliteStore(url, busy_timeout_ms=busy_timeout_ms)
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        from service.store.postgres import PostgresStore

        return PostgresStore(
            url.replace("postgresql+psycopg://", "postgresql://", 1),
            busy_timeout_ms=busy_timeout_ms,
            pool_min=pool_min,
            pool_max=pool_max,
        )
    raise ValueError(
        f"unsupported database URL {url.split('://', 1)[0]!r}: use sqlite:///path.db or "
        "postgresql://user@host:5432/db"
    )


__all__ = ["open_store"]
