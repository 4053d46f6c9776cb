"""Pure schedule math: spec models, compiled curves, plateau transitions (no I/O).

Public API (see docs/architecture.md)::

    from service.schedules import Program, ScheduleSpec, SpecError
"""

from .base import MAX_NESTING, MAX_STEP, ProgramState, ScheduleNode, SpecError
from .program import GroupSpec, Program, ScheduleSpec
from .spec import ALL_NODES, NODE_TYPES, AnySchedule, schedule_adapter
from .torch_compose import ScanBacking, set_scan_backing

__all__ = [
    "ALL_NODES",
    "MAX_NESTING",
    "MAX_STEP",
    "NODE_TYPES",
    "AnySchedule",
    "GroupSpec",
    "Program",
    "ProgramState",
    "ScanBacking",
    "ScheduleNode",
    "ScheduleSpec",
    "SpecError",
    "schedule_adapter",
    "set_scan_backing",
]
