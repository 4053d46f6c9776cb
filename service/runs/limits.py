"""What a spec and an answer may cost: the limits every request is held to.

A spec is accepted only if the run could serve, within the work budget, what every accepted
run serves (:func:`check_spec_limits`: when a run is created or amended, and for a preview);
one answer holds at most ``MAX_WINDOW_VALUES`` values (:func:`check_values`), and a curve
spans a bounded range of steps (:func:`check_span`). Each refusal says what would fit. The
work budget and the cost of a window are ``service.schedules.cost``'s.
"""

from __future__ import annotations

from service.runs.errors import InvalidArgument
from service.schedules import Program
from service.schedules.cost import WORK_BUDGET, WorkLimitExceeded, check_work

MAX_WINDOW_VALUES = 1 << 20
"""Most values (steps x series) one window, preview or curve answers: bounds a body to about
25 MB and the request's memory to about 150 MB (see docs/operations.md)."""
MIN_GUARANTEED_WINDOW = 256
"""Every accepted spec answers a window of this many steps at step 0 within the budget."""
MIN_GUARANTEED_STEP = 1 << 20
"""... and a single step at any step below this one to a trainer walking forward: a scan
resumes from the checkpoints its earlier steps left (a checkpoint every 2,048 steps), so its
cost is that of a few blocks, not of every step before (see ``service.schedules.cost``)."""
MAX_SPEC_NODES = 4096
"""Most schedule nodes one spec (every part together) may have."""


def check_values(series: int, count: int, what: str) -> None:
    """Refuse an answer of more than ``MAX_WINDOW_VALUES`` values (``count`` steps of
    ``series`` series), naming the largest count that fits."""
    if count * series > MAX_WINDOW_VALUES:
        fits = max(1, MAX_WINDOW_VALUES // max(series, 1))
        raise WorkLimitExceeded(
            what,
            "values",
            count * series,
            MAX_WINDOW_VALUES,
            f"the run has {series} series (groups x fields): ask for count <= {fits}",
            fits,
        )


def check_spec_limits(
    program: Program, budget: int = WORK_BUDGET, horizon: int | None = None
) -> None:
    """Refuse a spec that an accepted run could not serve within the work budget: more than
    ``MAX_SPEC_NODES`` nodes, a ``MIN_GUARANTEED_WINDOW``-step window over the budget, or a
    recursion whose single step at ``MIN_GUARANTEED_STEP`` (or at the run's ``horizon``, when
    it names an earlier end) is over it.

    A run that says how long it trains (``metadata.total_steps``, or a schedule with an end)
    is held to its own length: a ChainedScheduler that scans is accepted for the steps it will
    be asked for, and a request past its end is refused when it comes, with the same message.

    The step is priced as a trainer walking forward meets it: its scans resume from nearby
    checkpoints (``check_work`` with ``resume``). A process with no checkpoint near a far
    step (none was ever computed there, on any replica) prices it cold and may refuse it,
    saying to ask for earlier steps first.
    """
    if program.nodes > MAX_SPEC_NODES:
        raise WorkLimitExceeded(
            "this spec",
            "spec nodes",
            program.nodes,
            MAX_SPEC_NODES,
            "split the schedule, or write repeated children as one node (StepLR with a "
            "smaller gamma, MultiStepLR with its milestones)",
        )
    window = MIN_GUARANTEED_WINDOW
    check_work(program, 0, window, budget, f"a {window}-step window of this spec")
    guaranteed = MIN_GUARANTEED_STEP if horizon is None else min(MIN_GUARANTEED_STEP, horizon)
    last = max(guaranteed - 1, 0)
    try:
        check_work(program, last, 1, budget, "one step", resume=True)
    except WorkLimitExceeded as exc:
        raise WorkLimitExceeded(
            f"one step at step {last:,} of this spec",
            exc.limit,
            exc.amount,
            exc.maximum,
            "it is evaluated step by step from the start (MultiplicativeLR, or a "
            "ChainedScheduler with a child that adds to the lr): set metadata.total_steps to "
            "the run's length when it is shorter, use fewer groups, a shorter expression or a "
            "closed-form schedule, or raise the server's LRSERVE_MAX_REQUEST_WORK",
        ) from None


def check_span(start: int, stop: int, max_span: int) -> None:
    if stop <= start:
        raise InvalidArgument(("stop",), f"stop ({stop}) must be greater than start ({start})")
    if stop - start > max_span:
        raise InvalidArgument(
            ("stop",), f"a curve spans at most {max_span} steps (asked {stop - start})"
        )
