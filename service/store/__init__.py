"""SQLite and PostgreSQL implementations of the run layer's repository
(:class:`service.runs.repository.Store`): the run layer owns the protocol, this package
implements it."""

from __future__ import annotations

from service.runs.repository import Store

_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
DEFAULT_MIN_FREE_BYTES = 32 * 1024 * 1024


def open_store(
    url: str,
    busy_timeout_ms: int = 5000,
    pool_min: int = 1,
    pool_max: int = 10,
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
) -> Store:
    """The store for a database URL (``sqlite:///...`` or ``postgresql://...``).

    ``min_free_bytes``: SQLite only, the free space below which :meth:`Store.ping` (the
    readiness check) fails.
    """
    if url.startswith("sqlite:"):
        from service.store.sqlite import SqliteStore

        return SqliteStore(url, busy_timeout_ms=busy_timeout_ms, min_free_bytes=min_free_bytes)
    if url.startswith(_POSTGRES_SCHEMES):
        from service.store.postgres import PostgresStore

        return PostgresStore(
            _psycopg_url(url),
            busy_timeout_ms=busy_timeout_ms,
            pool_min=pool_min,
            pool_max=pool_max,
        )
    raise ValueError(
        f"unsupported database URL {url.split('://', 1)[0]!r}: use sqlite:///path.db or "
        "postgresql://user@host:5432/db"
    )


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def preflight(url: str, busy_timeout_ms: int = 5000) -> None:
    """Check, before a server starts, that the database can be used at all.

    Raises :class:`~service.runs.repository.StoreFault` (with the fix in its message) for a
    fault that waiting does not cure: an unwritable SQLite path or file system, a file that
    is no SQLite database, a PostgreSQL database that is not UTF8. Raises
    :class:`~service.runs.repository.StoreBusy` when the database cannot be reached now
    (the server may start anyway and serve 503 until it can), ``ValueError`` for a bad URL.
    SQLite is migrated here; PostgreSQL is only connected to, once, so that a database that
    is down costs at most the connect timeout.
    """
    if url.startswith(_POSTGRES_SCHEMES):
        from service.store.postgres import preflight as postgres_preflight

        postgres_preflight(_psycopg_url(url), busy_timeout_ms / 1000)
        return
    store = open_store(url, busy_timeout_ms=busy_timeout_ms)
    try:
        store.migrate()
    finally:
        store.close()


__all__ = ["DEFAULT_MIN_FREE_BYTES", "open_store", "preflight"]
