"""The storage layer on both dialects: migrations, atomic transactions, serialised writers."""

from __future__ import annotations

import threading

import pytest

from service.runs import transactions
from service.runs.model import RunSpec
from service.runs.repository import ReportRow, utcnow
from service.store import open_store
from service.store.sql import migration_scripts
from tests.service.helpers import new_id, plateau_spec


def test_migrations_are_idempotent_and_concurrent(db_url: str) -> None:
    stores = [open_store(db_url) for _ in range(4)]
    errors: list[BaseException] = []

    def migrate(i: int) -> None:
        try:
            stores[i].migrate()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    stores[0].migrate()
    newest = max(v for v, _ in migration_scripts(stores[0].dialect))
    assert newest >= 2
    assert stores[0].schema_version() == newest  # type: ignore[attr-defined]
    for s in stores:
        s.close()


def test_failed_transaction_writes_nothing(db_url: str) -> None:
    store = open_store(db_url)
    store.migrate()
    rid = new_id()
    transactions.create_run(store, rid, RunSpec.model_validate(plateau_spec()))
    with pytest.raises(RuntimeError), store.transaction(rid) as tx:
        assert tx is not None
        tx.insert_report(ReportRow(1, 0, "{}", utcnow()))
        tx.add_event("override", 1, {})
        tx.run.version += 1
        tx.save()
        raise RuntimeError("boom")
    run = store.get_run(rid)
    assert run is not None and run.version == 1 and run.event_seq == 1
    assert store.reports(rid) == [] and [e.type for e in store.events(rid, 0, 10)] == ["created"]
    with store.transaction(new_id()) as missing:
        assert missing is None
    store.close()


def test_concurrent_reports_serialise(db_url: str) -> None:
    """Reports from many threads (separate connections) form one gap-free history."""
    store = open_store(db_url, busy_timeout_ms=30_000)
    store.migrate()
    rid = new_id()
    transactions.create_run(store, rid, RunSpec.model_validate(plateau_spec(world_size=4)))
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            for step in range(10):
                transactions.report(store, rid, step, r, {"val_loss": 1.0 + r})
                transactions.report(store, rid, step, r, {"val_loss": 1.0 + r})  # a retry
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    run = store.get_run(rid)
    assert run is not None
    assert run.version == 1 + 40 and run.completed_step == 9 and run.step == 9
    events = store.events(rid, 0, 1000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    completed = [e.step for e in events if e.type == "report_completed"]
    assert completed == list(range(10))
    assert len(store.reports(rid)) == 40
    store.close()


@pytest.mark.postgres
def test_sql_ascii_database_is_refused() -> None:
    """A SQL_ASCII database stores whatever bytes it is given and cannot be told what they
    mean (issue 14): migrating it is refused with the fix, and nothing is created in it."""
    import psycopg

    from service.runs.repository import StoreFault
    from tests.conftest import postgres_database

    with postgres_database(encoding="SQL_ASCII") as url:
        store = open_store(url)
        try:
            with pytest.raises(StoreFault, match="SQL_ASCII; lrserve needs UTF8") as info:
                store.migrate()
            assert "CREATE DATABASE lrserve ENCODING 'UTF8'" in str(info.value)
        finally:
            store.close()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('runs')").fetchone() == (None,)
