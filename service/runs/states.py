"""Stored run states: their reductions as rows, and the parsed texts and lists kept.

A metric-driven node's state holds every reduction it decided, and the values depend on all of
them. Since schema v5 they are rows of their own (see "reductions stored as rows" below) and a
state's stored text stays small. Two process caches spare the parsing:

- :data:`LOGS`, the parsed reduction lists by run, ``created_at``, branch and node: a report
  or a read finds the list there and reads only the rows after it (none, usually);
- :data:`STATES`, parsed state texts of 16 KiB and more keyed by the text itself (so never
  stale, whichever process wrote it): since v5 these are the states stored before it, with
  their reductions inline until their next write, and heads of very many nodes.

Small states (most runs: a few hundred bytes) are parsed as they are read: hashing the text
would cost as much as parsing it.

A parsed state is shared by every caller that reads the same run, so it must never be
modified in place. The schedule engine never does (its transitions build new dicts and new
reduction lists: ``service/schedules/plateau.py``); code that edits a state works on a copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from service.runs.errors import RunNotFound
from service.runs.repository import RunRecord, RunTx, Store, StoreBusy, dumps
from service.runs.values import BytesLRU

CACHED_FROM_CHARS = 16 * 1024
"""States of this many characters and more are cached (below, parsing costs about what the
text's hash does)."""
STATE_CACHE_BYTES = 16 * 1024 * 1024
"""The parsed-state cache's budget. Each entry is counted as 6x its text: the text itself (kept
as the key) and the parsed objects, measured at 2.3x (256 groups) to 5x (2 groups) the text.
(64 MiB before v5, when every plateau state held its reductions inline.)"""

STATES: BytesLRU[dict[str, Any]] = BytesLRU(STATE_CACHE_BYTES)
"""Parsed states by their stored text (see the module's docstring)."""


def _size(text: str) -> int:
    return 6 * len(text)


def parse_state(text: str) -> dict[str, Any]:
    """``json.loads(text)`` of a stored state, shared with every other reader of the same
    text: do not modify the result."""
    if len(text) < CACHED_FROM_CHARS:
        state: dict[str, Any] = json.loads(text)
        return state
    cached = STATES.get(text)
    if cached is None:
        cached = json.loads(text)
        STATES.put(text, cached, _size(text))
    return cached


def remember_state(text: str, state: dict[str, Any]) -> None:
    """``text`` (just stored) is ``state`` serialised: its next parse is a look-up. ``state``
    must be what ``json.loads(text)`` gives (the engine's states are JSON values: lists, not
    tuples) and must not be modified from now on."""
    if len(text) >= CACHED_FROM_CHARS:
        STATES.put(text, state, _size(text))


# -- reductions stored as rows ------------------------------------------------------------
#
# A metric-driven node's state holds every reduction it decided (``"reductions": [...]``),
# and the values depend on all of them, so stored inline the state grew with each one: a
# report parsed, dumped and rewrote megabytes (1.3 s a report at 10^5 reductions). Stored, a
# node's reductions are rows of their own (one appended per reduction) and the state's text,
# its *head*, keeps their count in their place: ``"reductions": 12``. A node with none keeps
# ``[]``, so a run that never reduced stores exactly what it did before; a state stored before
# this (its lists inline) is read as it is and moved to rows by its next write.
#
# The parsed lists are kept in :data:`LOGS`, by run, ``created_at``, branch and node. Within
# one branch of one run a node's reductions are only ever appended to (a rewind starts a new
# branch and rewrites the rows), so a kept list with at least the head's count holds the
# run's reductions; one with fewer is extended by reading only the rows after it. A list read
# inside a write transaction is kept only once the transaction has committed.

LOG_CACHE_BYTES = 112 * 1024 * 1024
"""The reduction lists' budget; one list may take all of it (10^5 reductions of 8 groups take
about 70 MB parsed, counted as 99 MB). Entries of runs that never reduced are not kept."""

LOGS: BytesLRU[list[dict[str, Any]]] = BytesLRU(LOG_CACHE_BYTES, LOG_CACHE_BYTES)
"""Parsed reduction lists by ``(run id, created_at, branch, node)`` (see above)."""

_READ_ATTEMPTS = 5

INLINE_ROWS = 512
"""A read on the event loop parses at most this many reduction rows (about 10 ms); a run whose
copy in this process is further behind is read in a worker thread (:class:`TooManyRows`)."""


class StateNotLoaded(RuntimeError):
    """A run record's state was used before its reductions were read (a bug of the caller:
    read the run with :func:`read_state` or :func:`load_in`)."""


class TooManyRows(Exception):
    """The read would parse more reduction rows than it was allowed (nothing was read)."""


class _Changed(Exception):
    """The run changed between reading its row and its reductions' rows (read it again)."""


def _stored_count(node: Any) -> int | None:
    """The count a head keeps in place of a node's reductions (``None``: kept inline)."""
    if isinstance(node, dict):
        count = node.get("reductions")
        if type(count) is int:
            return count
    return None


def _log_bytes(log: list[dict[str, Any]]) -> int:
    # Measured with tracemalloc: about 480 bytes per reduction plus 32-64 per group value.
    groups = len(log[0].get("lr", ())) if log else 0
    return len(log) * (480 + 64 * groups)


def _extend(log: list[dict[str, Any]], rows: list[str]) -> list[dict[str, Any]]:
    """``log`` and the parsed ``rows`` after it, as a new list (``log`` may be shared)."""
    out = list(log)
    previous = out[-1] if out else None
    # One parse of the rows joined (a cold read of 10^5 rows: a third less than one each).
    for reduction in json.loads(f"[{','.join(rows)}]"):
        # Most nodes reduce by the same factor every time: one list for all of them.
        if previous is not None and reduction.get("factor") == previous.get("factor"):
            reduction["factor"] = previous["factor"]
        out.append(reduction)
        previous = reduction
    return out


def _resolve(
    record: RunRecord,
    read_rows: Callable[[str, int, int, int], list[str]],
    keep: Callable[[tuple[str, str, int, str], list[dict[str, Any]]], None],
    max_rows: int | None = None,
) -> dict[str, Any]:
    head = parse_state(record.state)
    paths = [path for path, node in head.items() if _stored_count(node) is not None]
    if not paths:
        record.loaded = head
        return head
    state = dict(head)
    for path in paths:
        node = head[path]
        count: int = node["reductions"]
        key = (record.id, record.created_at, record.branch, path)
        kept = LOGS.get(key)
        if kept is not None and len(kept) >= count:
            log = kept if len(kept) == count else kept[:count]
        else:
            start = 0 if kept is None else len(kept)
            if max_rows is not None and count - start > max_rows:
                raise TooManyRows(count - start)
            rows = read_rows(path, record.branch, start, count)
            if len(rows) != count - start:
                raise _Changed
            log = _extend(kept or [], rows)
            keep(key, log)
        state[path] = {**node, "reductions": log}
    record.loaded = state
    return state


def full_state(record: RunRecord) -> dict[str, Any]:
    """The whole state of a run record that has been read (:func:`read_state`,
    :func:`load_in`), or of one whose head holds every reduction inline. Do not modify it."""
    if record.loaded is not None:
        return record.loaded
    head = parse_state(record.state)
    if any(_stored_count(node) is not None for node in head.values()):
        raise StateNotLoaded(f"run {record.id!r}: its state's reductions were not read")
    record.loaded = head
    return head


class _CommittedRows:
    """Reductions read outside a transaction, kept once the read has been checked."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.read_any = False
        self.pending: list[tuple[tuple[str, str, int, str], list[dict[str, Any]]]] = []

    def read(self, path: str, branch: int, start: int, stop: int) -> list[str]:
        self.read_any = True
        return self.store.reductions(self.run_id, path, branch, start, stop)

    def keep(self, key: tuple[str, str, int, str], log: list[dict[str, Any]]) -> None:
        self.pending.append((key, log))


def read_state(store: Store, record: RunRecord, max_rows: int | None = None) -> RunRecord:
    """``record`` (read outside a transaction) with its whole state read: ``record.loaded``.

    Its reductions' rows are read by a second query, so the run may have changed in between
    (rewound, deleted and created again): then the run is read again and the one returned is
    the newer record (a reduction in between is no change: it only appends rows after the
    head's count). Raises :class:`StoreBusy` if it keeps changing, and :class:`TooManyRows`
    when it would parse more than ``max_rows`` rows (the caller reads in a thread instead).
    """
    for _ in range(_READ_ATTEMPTS):
        source = _CommittedRows(store, record.id)
        try:
            _resolve(record, source.read, source.keep, max_rows)
            if source.read_any:
                # The rows are the head's if the run is the same one (not deleted and created
                # again) now that they have been read; the branch is checked by the query.
                current = store.run_version(record.id)
                if current is None or current[1] != record.created_at:
                    raise _Changed
            for key, log in source.pending:
                LOGS.put(key, log, _log_bytes(log))
            return record
        except _Changed:
            record.loaded = None
            fresh = store.get_run(record.id)
            if fresh is None:
                raise RunNotFound(record.id) from None
            record = fresh
    raise StoreBusy("the run kept changing while it was read; retry")


def _keep_on_commit(tx: RunTx, key: tuple[str, str, int, str], log: list[dict[str, Any]]) -> None:
    tx.on_commit(lambda: LOGS.put(key, log, _log_bytes(log)))


def load_in(tx: RunTx) -> dict[str, Any]:
    """The whole state of the run ``tx`` has locked (``tx.run.loaded`` from now on)."""
    run = tx.run
    if run.loaded is not None:
        return run.loaded

    try:
        return _resolve(run, tx.reductions, lambda key, log: _keep_on_commit(tx, key, log))
    except _Changed:
        # Under the run's lock the head and its rows are one: a row is missing from the store.
        raise StoreBusy(f"run {run.id!r}: its stored reductions are incomplete") from None


def save_in(tx: RunTx, state: dict[str, Any], rewrite: bool = False) -> None:
    """Store ``state`` as the locked run's new state: its head in ``tx.run.state``, the
    reductions its rows do not hold yet appended (all of them rewritten, on the run's current
    branch, when ``rewrite``: a rewind). ``tx.run.loaded`` becomes ``state``; the caller
    writes the run (``tx.save()``)."""
    run = tx.run
    previous = load_in(tx)
    old_head = parse_state(run.state)
    if rewrite:
        tx.delete_reductions()
    head: dict[str, Any] = {}
    kept: list[tuple[tuple[str, str, int, str], list[dict[str, Any]]]] = []
    for path, node in state.items():
        log = node.get("reductions") if isinstance(node, dict) else None
        stored = 0 if rewrite else _stored_count(old_head.get(path)) or 0
        if not isinstance(log, list):
            head[path] = node
            continue
        if stored:
            before = previous.get(path, {}).get("reductions", ())
            same = (
                len(log) >= stored
                and len(before) >= stored
                and (log[stored - 1] is before[stored - 1] or log[stored - 1] == before[stored - 1])
            )
            if not same:  # not an extension of what is stored: rewritten
                tx.delete_reductions(path)
                stored = 0
        if len(log) > stored:
            tx.append_reductions(path, run.branch, stored, [dumps(r) for r in log[stored:]])
        if log:
            head[path] = {**node, "reductions": len(log)}
            kept.append(((run.id, run.created_at, run.branch, path), log))
        else:
            head[path] = node
    if not rewrite:
        for path, node in old_head.items():
            if path not in state and _stored_count(node):
                tx.delete_reductions(path)
    run.state = dumps(head)
    remember_state(run.state, head)
    run.loaded = state
    for key, log in kept:
        _keep_on_commit(tx, key, log)
