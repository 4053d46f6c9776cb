"""The run list's derived facts: status, horizon, tags and search text (pure: no I/O).

- **Tags** of a run: ``metadata.tags`` when it is a list (its string items), plus
  ``metadata.tag`` when it is a string; deduplicated, in that order.
- **Search text** (``?q=``): the run id and every scalar value in the metadata (nested
  objects and lists included; keys are not searched), lower-cased, one per line. A query
  matches when it is a substring of one of those lines.
- **Horizon**: ``metadata.total_steps`` when it is a positive integer; else the largest
  horizon (``service.schedules.horizon``) among the groups' learning-rate schedules, with
  each amendment's schedule replacing the groups it takes from its ``from_step`` (counted
  from there with ``restart``); ``None`` only when no group's schedule has one.
- **Status**: ``finished`` when a heartbeat said so, or the completed step reached
  ``horizon - 1``; else ``running`` when the latest report or heartbeat is at or after
  ``active_since`` (now minus ``idle_after``); else ``idle``. The run list filters with the
  same rule in SQL (``service/store/sql.py`` ``FINISHED_SQL``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Literal

from service.runs.repository import DerivedColumns, dumps
from service.schedules.horizon import horizon
from service.schedules.spec import schedule_adapter

Status = Literal["running", "idle", "finished"]
STATUSES: tuple[Status, ...] = ("running", "idle", "finished")
DEFAULT_IDLE_AFTER = 300.0
"""Seconds without a report or heartbeat after which a run is ``idle`` (``--idle-after``)."""
MAX_TAGS = 64
"""Tags beyond this many are ignored (the run_tags table stays bounded per run)."""
MAX_TAG_LENGTH = 200


def run_tags(metadata: Mapping[str, Any]) -> list[str]:
    """The run's tags (see the module doc)."""
    found: list[str] = []
    tags = metadata.get("tags")
    if isinstance(tags, list):
        found.extend(t for t in tags if isinstance(t, str))
    tag = metadata.get("tag")
    if isinstance(tag, str):
        found.append(tag)
    out: list[str] = []
    for t in found:
        if t and len(t) <= MAX_TAG_LENGTH and t not in out:
            out.append(t)
    return out[:MAX_TAGS]


def search_text(run_id: str, metadata: Mapping[str, Any]) -> str:
    """What ``?q=`` searches: the id and the metadata's scalar values, lower-cased, one a
    line (a newline inside a value becomes a space, so a match never spans two values)."""
    lines = [run_id]
    stack: list[Any] = [metadata]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif item is None:
            continue
        elif isinstance(item, bool):
            lines.append("true" if item else "false")
        else:
            lines.append(" ".join(str(item).split("\n")))
    return "\n".join(lines).lower()


def _node_horizon(node: Mapping[str, Any]) -> int | None:
    try:
        return horizon(schedule_adapter.validate_python(node))
    except ValueError:  # (pydantic's ValidationError) a stored node this version reads no more
        return None


@lru_cache(maxsize=4096)
def run_horizon(spec_text: str, amendments_text: str = "[]") -> int | None:
    """The run's horizon (see the module doc) from its normalised spec and amendments."""
    spec = json.loads(spec_text)
    total = spec.get("metadata", {}).get("total_steps")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        return total
    names = [str(g["name"]) for g in spec["groups"]]
    group_schedules: dict[str, Any] = dict(spec.get("group_schedules") or {})
    per_group: dict[str, int | None] = {
        g: _node_horizon(group_schedules.get(g, spec["schedule"])) for g in names
    }
    amendments: Sequence[Mapping[str, Any]] = json.loads(amendments_text)
    for amendment in amendments:
        given_groups: Mapping[str, Any] = amendment.get("group_schedules") or {}
        group_schedules.update(given_groups)
        taken: dict[str, Mapping[str, Any]] = dict(given_groups)
        if amendment.get("schedule") is not None:
            # As in runs/timeline.py: the schedule takes every group without a group schedule.
            for g in names:
                if g not in group_schedules:
                    taken[g] = amendment["schedule"]
        offset = int(amendment["from_step"]) if amendment.get("restart") else 0
        for g, node in taken.items():
            h = _node_horizon(node)
            per_group[g] = None if h is None else offset + h
    known = [h for h in per_group.values() if h is not None]
    return max(known) if known else None


def derive(run_id: str, spec_text: str, amendments_text: str = "[]") -> DerivedColumns:
    """The columns the store keeps for the run list, from the spec and the amendments."""
    metadata = json.loads(spec_text).get("metadata") or {}
    return DerivedColumns(
        horizon=run_horizon(spec_text, amendments_text),
        tags=run_tags(metadata),
        search=search_text(run_id, metadata),
        metadata=dumps(metadata),
    )


def active_since(now: datetime, idle_after: float) -> str:
    """The time (stored format) from which activity makes a run ``running``."""
    at = now.astimezone(timezone.utc) - timedelta(seconds=idle_after)
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


def run_status(
    *,
    finished: bool,
    horizon: int | None,
    completed_step: int | None,
    last_report_at: str | None,
    heartbeat_at: str | None,
    active_since: str,
) -> Status:
    """The run's status (see the module doc); times are stored ISO strings (comparable)."""
    if finished or (
        horizon is not None and completed_step is not None and completed_step >= horizon - 1
    ):
        return "finished"
    last = max((t for t in (last_report_at, heartbeat_at) if t), default=None)
    if last is not None and last >= active_since:
        return "running"
    return "idle"


__all__ = [
    "DEFAULT_IDLE_AFTER",
    "MAX_TAGS",
    "STATUSES",
    "Status",
    "active_since",
    "derive",
    "run_horizon",
    "run_status",
    "run_tags",
    "search_text",
]
