"""Stored run states, parsed once: a cache keyed by the stored text itself.

A metric-driven run's state holds every reduction its plateau nodes decided (the values
depend on all of them), so its text grows with them: 3 MB at 10^4 reductions of 8 groups.
Parsed on every report, every GET of the run and every evaluation, that was 30 ms each, and a
report parsed it up to three times. Keyed by the text, an entry can never be stale (the same
text always parses to the same state, whichever process or replica wrote it), so nothing has
to invalidate it; a report primes it with the state it has just written, so the next report's
read of that text finds it.

Small states (most runs: a few hundred bytes) are parsed as before: hashing the text would
cost as much as parsing it. States over half the budget (about 5 MB of text, from about 2·10^4
reductions of 8 groups) are not kept either: those runs need their reductions stored outside
the state's JSON, which this cache does not do.

A parsed state is shared by every caller that reads the same text, so it must never be
modified in place. The schedule engine never does (its transitions build new dicts and new
reduction lists: ``service/schedules/plateau.py``); code that edits a state works on a copy.
"""

from __future__ import annotations

import json
from typing import Any

from service.runs.values import BytesLRU

CACHED_FROM_CHARS = 16 * 1024
"""States of this many characters and more are cached (below, parsing costs about what the
text's hash does)."""
STATE_CACHE_BYTES = 64 * 1024 * 1024
"""The parsed-state cache's budget. Each entry is counted as 6x its text: the text itself (kept
as the key) and the parsed objects, measured at 2.3x (256 groups) to 5x (2 groups) the text."""

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
