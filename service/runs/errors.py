"""The run layer's errors: what a request may be refused for, in the run's own terms.

They carry no HTTP knowledge; ``service.api.problems`` maps each type to a status, a problem
slug and, for :class:`InvalidArgument`, the request location of the field.
"""

from __future__ import annotations

from collections.abc import Sequence


class RunError(Exception):
    """Base of every refusal by the run layer; ``message`` is meant for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RunNotFound(RunError):
    """No run has this id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")
        self.run_id = run_id


class RunConflict(RunError):
    """A run with this id exists with another spec."""


class ReportConflict(RunError):
    """The same (step, rank) was already reported with other values."""


class StaleReport(RunError):
    """A report for a step older than the newest completed one."""


class TooLate(RunError):
    """A change from a step that trainers may already have applied: ``earliest_step`` is the
    first step the server can still guarantee every trainer applies it from."""

    def __init__(self, message: str, earliest_step: int) -> None:
        super().__init__(message)
        self.earliest_step = earliest_step


class RewindConflict(RunError):
    """A rewind key already used on this run for another step."""


class InvalidArgument(RunError):
    """An argument that is well-formed alone but not for this run (an unknown group, a rank
    beyond the world size, an empty range). ``field`` names it as a path of the use case's
    arguments (``("groups", 1)``), which the HTTP layer places in the query or the body."""

    def __init__(self, field: Sequence[str | int], msg: str) -> None:
        super().__init__(f"{'.'.join(str(p) for p in field)}: {msg}")
        self.field = tuple(field)
        self.msg = msg


__all__ = [
    "InvalidArgument",
    "ReportConflict",
    "RewindConflict",
    "RunConflict",
    "RunError",
    "RunNotFound",
    "StaleReport",
    "TooLate",
]
