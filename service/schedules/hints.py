"""Messages that name the fix for a spec pydantic refused: did-you-mean for a mistyped schedule
``type`` or argument, and a bare schedule node sent where a run body belongs.

Pure functions over pydantic's error dicts (``{"loc", "msg", "type", ...}``), so the HTTP layer
can apply them to every validation error whatever parsed the body.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .spec import NODE_TYPES

# pydantic's message for an unknown discriminator value; the tag is read from it when the
# error's ``ctx`` was not kept (the hot paths drop it).
_TAG_IN_MSG = re.compile(r"Input tag '(?P<tag>[^']*)' found using")
_TYPES_HINT = "docs/schedules.md lists every type"
_EXAMPLE_BODY = '{"groups": [{"name": "default", "lr": 0.1}], "schedule": {...}}'


def close_names(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` closest to ``name`` (case-insensitively), best first: the best
    match and those about as close as it (a clear winner is suggested alone)."""
    by_lower: dict[str, str] = {}
    for known in names:
        by_lower.setdefault(known.lower(), known)
    # A lower cutoff than difflib's 0.6: short argument names ("gama") are worth a guess.
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.5)
    if not found:
        return []

    def score(candidate: str) -> float:
        return difflib.SequenceMatcher(None, name.lower(), candidate).ratio()

    best = score(found[0])
    return [by_lower[f] for f in found if score(f) >= best - 0.05]


def node_arguments(type_name: str) -> list[str]:
    """The arguments a schedule node of ``type_name`` takes (``type`` aside), in order."""
    node = NODE_TYPES[type_name]
    return [f.alias or name for name, f in node.model_fields.items() if name != "type"]


def _did_you_mean(candidates: Sequence[str]) -> str:
    if not candidates:
        return ""
    quoted = " or ".join(repr(c) for c in candidates)
    return f"; did you mean {quoted}?"


def unknown_type_message(tag: str) -> str:
    """The message for a schedule node whose ``type`` is ``tag``, which no node has."""
    guess = _did_you_mean(close_names(tag, list(NODE_TYPES), n=2))
    return f"unknown schedule type {tag!r}{guess} ({_TYPES_HINT}, {len(NODE_TYPES)} in all)"


def unknown_argument_message(type_name: str, argument: str) -> str:
    """The message for ``argument`` given to a node of ``type_name``, which does not take it."""
    takes = node_arguments(type_name)
    guess = _did_you_mean(close_names(argument, takes, n=2))
    listed = ", ".join(takes) if takes else "no arguments"
    return f"unknown argument {argument!r} for {type_name}{guess} ({type_name} takes: {listed})"


def explain(error: Mapping[str, Any]) -> str | None:
    """A message naming the fix for one pydantic error in a spec, or None to keep pydantic's."""
    kind = error.get("type")
    loc = list(error.get("loc") or ())
    if kind == "union_tag_invalid":
        ctx = error.get("ctx") or {}
        tag = ctx.get("tag")
        if tag is None:
            match = _TAG_IN_MSG.search(str(error.get("msg", "")))
            tag = match.group("tag") if match else None
        return unknown_type_message(str(tag)) if tag is not None else None
    if kind == "union_tag_not_found":
        return (
            'a schedule node needs a "type", e.g. {"type": "StepLR", "step_size": 30} '
            f"({_TYPES_HINT})"
        )
    if kind == "extra_forbidden" and len(loc) >= 2 and isinstance(loc[-1], str):
        # A discriminated union puts the node's type in the location: [..., "StepLR", "gama"].
        owner = loc[-2]
        if isinstance(owner, str) and owner in NODE_TYPES:
            return unknown_argument_message(owner, loc[-1])
    return None


def _bare_node(errors: Sequence[Mapping[str, Any]]) -> tuple[Any, str] | None:
    """(the body's location, its type) when a body that needs ``schedule`` was one node."""
    for error in errors:
        loc = list(error.get("loc") or ())
        if error.get("type") == "extra_forbidden" and loc[-1:] == ["type"] and len(loc) <= 2:
            parent = loc[:-1]
            needs_schedule = any(
                e.get("type") == "missing" and list(e.get("loc") or ()) == [*parent, "schedule"]
                for e in errors
            )
            if needs_schedule:
                return parent, str(error.get("input", "") or "")
    return None


def improve(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``errors`` with messages that name the fix: a bare schedule node sent as a run body
    becomes one error saying so; unknown types and arguments get did-you-mean suggestions."""
    bare = _bare_node(errors)
    if bare is not None:
        parent, tag = bare
        what = f" (type {tag!r})" if tag else ""
        msg = (
            f"this is a single schedule node{what}, not a run body: put it under "
            f'"schedule", with the groups it applies to, e.g. {_EXAMPLE_BODY}'
        )
        return [{"loc": parent, "msg": msg}]
    out = []
    for error in errors:
        better = explain(error)
        item = {"loc": list(error.get("loc") or ()), "msg": better or str(error.get("msg", ""))}
        out.append(item)
    return out
