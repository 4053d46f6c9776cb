"""Group commit: the writes that arrive together on one event loop share one transaction.

A report's transaction costs little next to its COMMIT and BEGIN IMMEDIATE, and each commit
appends every page it dirtied to the WAL (later copied again by the checkpoint). Reports that
arrive in the same turn of the event loop (16 trainers' connections become readable together)
are therefore run one after another inside one store transaction, each within its own savepoint
(``SqliteStore.group``): a refused write rolls back alone and answers as it would have alone;
the others become durable at the one COMMIT, and no write's answer is given before it.

When the write lock is taken (another process, or a checkpoint of this one), the batch waits on
the loop with short pauses while more writes join it, then goes to a worker thread as a whole,
where waiting for the lock is harmless. Stores without groups (PostgreSQL) take every write to a
thread as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from anyio import to_thread

from service.runs.repository import StoreBusy, StoreError, WouldBlock

T = TypeVar("T")

# Pauses before retrying a batch whose lock was taken (7.5 ms in all), then a worker thread.
_RETRY_DELAYS = (0.0005, 0.001, 0.002, 0.004)

_Item = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class GroupWriter:
    """Runs writes (each a function that opens one ``store.transaction``) in groups.

    Only one batch is in flight per writer, so batches commit in the order they were formed and
    a run's reports keep their arrival order.
    """

    def __init__(self, store: Any, max_batch: int = 32) -> None:
        self.store = store
        self.max_batch = max_batch
        """Most writes per group: a group runs on the loop from BEGIN to COMMIT, so a bound
        keeps the other requests' wait short (32 reports take a few milliseconds)."""
        self._pending: list[_Item] = []
        self._flusher: asyncio.Task[None] | None = None
        self.groups = 0
        """Groups committed so far (with :attr:`grouped`, how well writes are grouped)."""
        self.grouped = 0
        """Writes that went through a committed group."""

    @property
    def enabled(self) -> bool:
        """Whether the store can group writes (SQLite); otherwise :meth:`write` is not used."""
        return bool(getattr(self.store, "group_commit", False))

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` within the next group; returns (or raises) what the call did, once the
        group has committed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, args, fut))
        if self._flusher is None:
            # A task's first step runs after the callbacks already queued in this turn of the
            # loop: the requests read in the same turn join the batch.
            self._flusher = loop.create_task(self._flush_all())
        return await fut

    async def _flush_all(self) -> None:
        try:
            # One more turn of the loop: the requests whose bytes the same poll delivered are
            # parsed in it and join the group.
            await asyncio.sleep(0)
            attempt = 0
            while self._pending:
                batch = self._pending[: self.max_batch]
                if self._run(batch, nowait=True):
                    del self._pending[: len(batch)]
                    attempt = 0
                    continue
                if attempt < len(_RETRY_DELAYS):
                    # The lock is usually held for one short commit: wait on the loop, where the
                    # writes arriving meanwhile join the batch.
                    await anyio.sleep(_RETRY_DELAYS[attempt])
                    attempt += 1
                    continue
                batch = self._pending[: self.max_batch]
                del self._pending[: len(batch)]
                attempt = 0
                await to_thread.run_sync(self._run, batch, False)
        except BaseException as exc:  # cancelled with the loop: nobody waits for the answers
            for _, _, fut in self._pending:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else StoreError(str(exc)))
            self._pending.clear()
            raise
        finally:
            self._flusher = None

    def _run(self, batch: list[_Item], nowait: bool) -> bool:
        """One group: False when (nowait) the lock was taken and nothing was written."""
        store = self.store
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            if nowait:
                with store.nowait(), store.group(len(batch)):
                    outcomes = [_call(fn, args, fut) for fn, args, fut in batch]
            else:
                with store.group(len(batch)):
                    outcomes = [_call(fn, args, fut) for fn, args, fut in batch]
        except WouldBlock:
            if nowait:
                return False  # raised by BEGIN (or a failed COMMIT, rolled back): retry all
            busy = StoreBusy("the SQLite database is locked by another writer")
            outcomes = [(fut, False, busy) for *_, fut in batch]
        except StoreError as exc:
            # The group did not commit: none of its writes happened.
            outcomes = [(fut, False, exc) for *_, fut in batch]
        else:
            self.groups += 1
            self.grouped += len(batch)
        for fut, ok, value in outcomes:
            loop = fut.get_loop()
            if nowait:
                _settle(fut, ok, value)
            else:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
        return True


def _call(
    fn: Callable[..., Any], args: tuple[Any, ...], fut: asyncio.Future[Any]
) -> tuple[asyncio.Future[Any], bool, Any]:
    try:
        return fut, True, fn(*args)
    except Exception as exc:  # the write's own refusal: its savepoint rolled it back
        return fut, False, exc


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # the request was cancelled meanwhile (its write still happened)
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
