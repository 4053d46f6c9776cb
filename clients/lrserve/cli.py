"""The ``lrserve`` command: run the server, inspect and steer runs, preview schedules.

Exit codes: 0 success; 1 the server answered with an error (its problem detail is
printed); 2 usage or configuration error (bad arguments, unreadable spec file, missing
optional dependency); 3 the server cannot be reached.

Global options (``--url``, ``--token``, ``--json``, ``--timeout``, ``--retries``) may be
given before or after the subcommand; ``--url``/``--token`` default to ``LRSERVE_URL`` and
``LRSERVE_TOKEN``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ._client import Client
from ._errors import APIError, TransportError, UsageError
from ._version import __version__

__all__ = ["main"]

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3

_SERVER_MODULES = frozenset(
    {"service", "fastapi", "uvicorn", "starlette", "pydantic", "numpy", "prometheus_client"}
)


class _Fail(Exception):
    """A usage problem found by a command (exit code 2)."""


# -- formatting -----------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO) -> None:
    """Print an aligned table; numbers right-aligned, text left-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [
        all(_is_number(row[i]) for row in cells if row[i] != "-") and bool(cells)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out.write(line(list(headers)) + "\n")
    for row in cells:
        out.write(line(row) + "\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pairs(pairs: Iterable[tuple[str, Any]], out: TextIO) -> None:
    items = list(pairs)
    width = max((len(k) for k, _ in items), default=0)
    for key, value in items:
        out.write(f"{key.ljust(width)}  {_fmt(value)}\n")


def _columns(groups: Mapping[str, Mapping[str, Sequence[float]]]) -> list[tuple[str, str]]:
    """(group, field) pairs in server order; field names prefixed with the group."""
    return [(g, f) for g, fields in groups.items() for f in fields]


def _pick_nearest(steps: Sequence[int], start: int, total: int, rows: int) -> list[int]:
    """Indices of the ``steps`` nearest to ``rows`` steps spread evenly over
    ``[start, start + total)``, first and last included."""
    if not steps:
        return []
    targets = [start + round(k * (total - 1) / max(rows - 1, 1)) for k in range(max(rows, 1))]
    picked = set()
    for target in targets:
        i = bisect.bisect_left(steps, target)
        near = [j for j in (i - 1, i) if 0 <= j < len(steps)]
        picked.add(min(near, key=lambda j: abs(steps[j] - target)))
    return sorted(picked)


def _pick_rows(n: int, rows: int) -> list[int]:
    """``rows`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= rows:
        return list(range(n))
    if rows <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (rows - 1)) for i in range(rows)})


# -- commands -------------------------------------------------------------------------


def _cmd_runs(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    filters: dict[str, Any] = {
        "status": [s for item in args.status or [] for s in item.split(",") if s] or None,
        "search": args.search,
        "tags": args.tag or (),
        "sort": args.sort,
    }
    if args.all:
        runs = list(client.iter_runs(page_size=args.limit, **filters))
        result: Any = {"runs": runs, "next_cursor": None}
    else:
        result = client.list_runs(limit=args.limit, cursor=args.cursor, **filters)
        runs = result.get("runs", [])
    if args.json:
        return result
    _table(
        ["id", "status", "created_at", "step", "version", "tags"],
        [
            [
                r.get("id"),
                r.get("status", ""),
                r.get("created_at"),
                r.get("step"),
                r.get("version"),
                ",".join(r.get("tags") or []),
            ]
            for r in runs
        ],
        out,
    )
    if result.get("next_cursor"):
        out.write(f"(more: --cursor {result['next_cursor']} or --all)\n")
    return None


def _cmd_show(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    run = client.get_run(args.run)
    if args.json:
        return run
    spec = run.get("spec", {})
    _pairs(
        [
            ("run", run.get("id")),
            ("version", run.get("version")),
            ("created_at", run.get("created_at")),
            ("updated_at", run.get("updated_at")),
            ("step", run.get("step")),
            ("completed_step", run.get("completed_step")),
            ("world_size", spec.get("world_size")),
            ("aggregate", spec.get("aggregate")),
        ],
        out,
    )
    groups = spec.get("groups") or []
    if groups:
        # Normalised specs spell out every optional field as null; show only the used ones.
        keys = sorted({k for g in groups for k, v in g.items() if v is not None} - {"name"})
        out.write("\ngroups\n")
        _table(["name", *keys], [[g.get("name"), *(g.get(k) for k in keys)] for g in groups], out)
    out.write(f"\nschedule  {_fmt(spec.get('schedule'))}\n")
    for name, node in (spec.get("group_schedules") or {}).items():
        out.write(f"  {name}: {_fmt(node)}\n")
    if spec.get("metadata"):
        out.write(f"metadata  {_fmt(spec['metadata'])}\n")
    if run.get("state"):
        out.write(f"state     {_fmt(run['state'])}\n")
    out.write(
        f"branch    {run.get('branch', 0)}  (rewinds so far); changes can start at step "
        f"{run.get('leased_until', 0)} (trainers hold values up to there)\n"
    )
    overrides = run.get("overrides") or []
    if overrides:
        out.write("\noverrides\n")
        keys = ["n", "from_step", "until_step", "action", "value", "field", "groups", "note"]
        _table(keys, [[o.get(k) for k in keys] for o in overrides], out)
    amendments = run.get("amendments") or []
    if amendments:
        out.write("\namendments\n")
        keys = ["n", "from_step", "restart", "base", "parts", "note"]
        rows = [
            [*(a.get(k) for k in keys[:4]), _amended_parts(a), a.get("note")] for a in amendments
        ]
        _table(keys, rows, out)
    rewinds = run.get("rewinds") or []
    if rewinds:
        out.write("\nrewinds\n")
        keys = ["n", "from_step", "to_step", "reports_set_aside", "key", "note"]
        _table(keys, [[r.get(k) for k in keys] for r in rewinds], out)
    return None


def _amended_parts(amendment: Mapping[str, Any]) -> str:
    parts = []
    if amendment.get("schedule"):
        parts.append(f"schedule={amendment['schedule'].get('type')}")
    for key in ("group_schedules", "param_schedules"):
        for name, node in (amendment.get(key) or {}).items():
            parts.append(f"{name}={node.get('type')}")
    return " ".join(parts)


def _cmd_lr(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    if args.count is not None:
        window = client.get_lr_window(args.run, args.start or 0, args.count, lease=False)
        groups = window.values or {}
        if args.json:
            return {
                "run": window.run,
                "start": window.start,
                "count": window.count,
                "version": window.version,
                "groups": groups,
            }
        _window_table(window.start, None, groups, window.count, args.rows, out)
        return None
    if args.start is not None:
        raise _Fail("--start needs --count")
    values = client.get_lr(args.run, step=args.step, lease=False)
    if args.json:
        return values
    fields = sorted({f for g in values["groups"].values() for f in g}, key=_field_order)
    out.write(f"run {values['run']}  step {values['step']}  version {values['version']}\n")
    _table(
        ["group", *fields],
        [[name, *(g.get(f) for f in fields)] for name, g in values["groups"].items()],
        out,
    )
    return None


def _field_order(name: str) -> tuple[int, str]:
    return (0 if name == "lr" else 1, name)


def _window_table(
    start: int,
    steps: Sequence[int] | None,
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    count: int,
    rows: int,
    out: TextIO,
    total: int | None = None,
) -> None:
    """A table of about ``rows`` of the ``count`` steps (``steps``: a decimated answer's own
    steps, out of ``total``)."""
    cols = _columns(groups)
    n = len(steps) if steps is not None else count
    if cols:
        n = min(n, *(len(groups[g][f]) for g, f in cols))
    if steps is not None and total is not None and total > n:
        # A decimated answer's steps are uneven: show those nearest to evenly spread ones.
        picked = _pick_nearest(steps[:n], start, total, rows)
    else:
        picked = _pick_rows(n, rows)
    headers = ["step", *(f"{g}.{f}" for g, f in cols)]
    body = [
        [steps[i] if steps is not None else start + i, *(groups[g][f][i] for g, f in cols)]
        for i in picked
    ]
    _table(headers, body, out)
    if total is not None and total > n:
        out.write(f"({len(picked)} of {total} steps shown, from {n} the server picked)\n")
    elif len(picked) < n:
        out.write(f"({len(picked)} of {n} steps shown; --rows to change)\n")


def _cmd_events(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    result = client.get_events(args.run, after=args.after)
    if args.json:
        return result
    _table(
        ["seq", "type", "step", "at", "data"],
        [
            [e.get("seq"), e.get("type"), e.get("step"), e.get("at"), e.get("data")]
            for e in result["events"]
        ],
        out,
    )
    return None


def _cmd_metrics(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    if args.name is None:
        try:
            listed = client.get_metric_names(args.run)
        except APIError as exc:
            # A server from before the names listing asks for ?name=: say what to do instead.
            if exc.status == 422 and any(e.get("loc") == ["query", "name"] for e in exc.errors):
                raise _Fail("this server cannot list metric names: give the NAME") from None
            raise
        if args.json:
            return listed
        names = listed.get("names", [])
        for name in names:
            out.write(f"{name}\n")
        if not names:
            out.write(f"(no metric reported to {args.run} yet)\n")
        return None
    result = client.get_metrics(args.run, args.name)
    if args.json:
        return result
    _table(
        ["step", "rank", "value"],
        [[p.get("step"), p.get("rank"), p.get("value")] for p in result.get("points", [])],
        out,
    )
    return None


def _read_json(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise _Fail(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Fail(f"{path} is not valid JSON: {exc}") from None


MAX_WINDOW = 100_000
"""The most steps the server answers one by one (a window, a preview's ``count``)."""
LONG_PREVIEW_POINTS = 2_000
"""Points a longer preview asks the server for: plenty for a table or a plot."""


def _group_options(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The groups ``--lr`` / ``--group NAME=LR`` give (None: neither was given)."""
    if getattr(args, "group_lr", None):
        groups = []
        for text in args.group_lr:
            name, lr = _parse_metric(text)
            groups.append({"name": name, "lr": lr})
        return groups
    if getattr(args, "lr", None) is not None:
        return [{"name": "default", "lr": args.lr}]
    return None


def _run_body(spec: Any, args: argparse.Namespace, default_lr: float | None) -> dict[str, Any]:
    """The run body SPEC.json stands for: a run body as it is, or a bare schedule node
    (``{"type": ...}``) put under ``schedule`` with the groups of ``--lr``/``--group``."""
    if not isinstance(spec, dict):
        raise _Fail(f"{args.spec}: expected a JSON object (a run body or a schedule node)")
    groups = _group_options(args)
    if "type" in spec and "schedule" not in spec:
        if groups is None and default_lr is None:
            raise _Fail(
                f"{args.spec} is a single schedule node: give the groups it applies to with "
                '--lr LR or --group NAME=LR, or write a run body {"groups": [...], '
                '"schedule": {...}}'
            )
        return {"groups": groups or [{"name": "default", "lr": default_lr}], "schedule": spec}
    if groups is not None:
        if "groups" in spec:
            raise _Fail(f"--lr/--group: {args.spec} has its own groups; give one or the other")
        return {**spec, "groups": groups}
    return spec


def _cmd_preview(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    # A bare node previews on one group of lr 1 by default: the values are its factors.
    spec = _run_body(_read_json(args.spec), args, default_lr=1.0)
    plot = _load_pyplot() if args.png else None
    if args.steps > MAX_WINDOW:
        # Too long to send step by step: the server decimates (each bucket's min and max
        # step, the first and last included), which is all a table or a plot shows anyway.
        stop = args.start + args.steps
        result = client.preview(spec, start=args.start, stop=stop, points=LONG_PREVIEW_POINTS)
    else:
        result = client.preview(spec, start=args.start, count=args.steps)
    groups = result.get("groups", {})
    steps = result.get("steps")
    if plot is not None:
        _plot(plot, args.png, args.start, steps, groups, title=Path(args.spec).name)
    if args.json:
        return result
    _window_table(
        args.start, steps, groups, result.get("count", args.steps), args.rows, out, args.steps
    )
    if args.png:
        out.write(f"wrote {args.png}\n")
    return None


def _load_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise _Fail("--png needs matplotlib: pip install 'lrserve[plot]'") from None
    # Agg: no display needed, and it never tries to open a window from a terminal tool.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(
    plt: Any,
    path: str,
    start: int,
    steps: Sequence[int] | None,
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
) -> None:
    fields = sorted({f for g in groups.values() for f in g}, key=_field_order) or ["lr"]
    fig, axes = plt.subplots(
        len(fields), 1, sharex=True, figsize=(8, 2.6 * len(fields) + 0.6), squeeze=False
    )
    for ax, field in zip(axes[:, 0], fields, strict=True):
        for name, values in groups.items():
            if field in values:
                ys = values[field]
                xs = steps if steps is not None else range(start, start + len(ys))
                ax.plot(list(xs), ys, label=name, linewidth=1.2)
        ax.set_ylabel(field)
        ax.grid(True, alpha=0.3)
        if len(groups) > 1:
            ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise _Fail(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _parse_metric(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise _Fail(f"expected name=value, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise _Fail(f"{name}: {value!r} is not a number") from None


def _cmd_report(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    if not args.values:
        raise _Fail("give at least one metric as name=value")
    values = dict(_parse_metric(v) for v in args.values)
    result = client.report(args.run, args.step, values, rank=args.rank, wait=args.wait)
    if args.json:
        return result
    decision = result.get("decision")
    _pairs(
        [
            ("run", result.get("run")),
            ("step", result.get("step")),
            ("rank", result.get("rank")),
            ("complete", result.get("complete")),
            ("reported_ranks", result.get("reported_ranks")),
            ("version", result.get("version")),
            ("reduced", None if decision is None else decision.get("reduced")),
        ],
        out,
    )
    groups = result.get("groups") or {}
    if groups:
        fields = sorted({f for g in groups.values() for f in g}, key=_field_order)
        out.write(f"\nvalues from step {result.get('applies_from')}\n")
        _table(
            ["group", *fields],
            [[name, *(g.get(f) for f in fields)] for name, g in groups.items()],
            out,
        )
    return None


def _cmd_create(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    spec = _run_body(_read_json(args.spec), args, default_lr=None)
    run, created = client.create_run(args.run, spec)
    if args.json:
        return {"created": created, "run": run}
    out.write(
        f"{'created' if created else 'exists (same spec)'}: {run.get('id')} "
        f"version {run.get('version')}\n"
    )
    return None


def _cmd_delete(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    client.delete_run(args.run, missing_ok=args.missing_ok)
    if args.json:
        return {"deleted": args.run}
    out.write(f"deleted {args.run}\n")
    return None


def _cmd_override(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    if args.withdraw is not None:
        run = client.withdraw_override(args.run, args.withdraw, from_step=args.from_step)
        if args.json:
            return run
        ov = run["overrides"][args.withdraw - 1]
        out.write(
            f"withdrew override {args.withdraw} ({ov.get('action')} {ov.get('field')} by "
            f"{_fmt(ov.get('value'))} from step {ov.get('from_step')}) from step "
            f"{ov.get('until_step')}: {run.get('id')} version {run.get('version')}\n"
        )
        return None
    if args.from_step is None:
        raise _Fail("--from-step is required with --scale or --set")
    action, value = ("scale", args.scale) if args.scale is not None else ("set", args.set)
    run = client.override(
        args.run, args.from_step, action, value, args.group, field=args.field, note=args.note
    )
    if args.json:
        return run
    out.write(
        f"{action} {args.field} to {_fmt(value)} from step {args.from_step}: "
        f"{run.get('id')} version {run.get('version')}\n"
    )
    return None


def _cmd_amend(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    doc = _read_json(args.spec)
    if not isinstance(doc, dict):
        raise _Fail(f"{args.spec}: expected a JSON object (a schedule node or the parts)")
    parts_keys = ("schedule", "group_schedules", "param_schedules")
    # A bare node ({"type": ...}) is the new schedule; otherwise the parts by name.
    parts = {"schedule": doc} if "type" in doc else {k: doc[k] for k in parts_keys if k in doc}
    unknown = [] if "type" in doc else sorted(set(doc) - set(parts_keys))
    if unknown or not parts:
        raise _Fail(
            f"{args.spec}: expected a schedule node or some of {', '.join(parts_keys)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    run, created = client.amend(
        args.run,
        args.from_step,
        parts.get("schedule"),
        group_schedules=parts.get("group_schedules"),
        param_schedules=parts.get("param_schedules"),
        restart=args.restart,
        base=args.base,
        note=args.note or "",
    )
    if args.json:
        return {"created": created, "run": run}
    amendment: Mapping[str, Any] = next(
        (a for a in reversed(run.get("amendments") or []) if a.get("from_step") == args.from_step),
        {},
    )
    how = ("restarting its step count" if args.restart else "on the run's steps") + (
        ", from the values in force then" if args.base == "current" else ""
    )
    verb = "amended" if created else "already amended (same amendment)"
    out.write(
        f"{verb}: {run.get('id')} from step {args.from_step}, {how}: "
        f"{_amended_parts(amendment)}; version {run.get('version')}\n"
    )
    return None


def _cmd_rewind(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    before = client.get_run(args.run)
    run = client.rewind(args.run, args.to_step, key=args.key, note=args.note or "")
    if args.json:
        return run
    if run.get("branch") == before.get("branch"):
        out.write(f"already rewound with key {args.key!r}: {run.get('id')} unchanged\n")
        return None
    done = (run.get("rewinds") or [{}])[-1]
    out.write(
        f"rewound {run.get('id')} from step {done.get('from_step')} to step {args.to_step}: "
        f"{done.get('reports_set_aside')} report(s) after it set aside (branch "
        f"{before.get('branch', 0)}, still readable); now on branch {run.get('branch')}, "
        f"version {run.get('version')}; reports from step {args.to_step + 1} are accepted\n"
    )
    return None


# -- parser ---------------------------------------------------------------------------


def _nonneg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive(text: str) -> int:
    value = _nonneg(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def _cmd_range_test(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    from .range_test import RULES, adopt

    plot = _load_pyplot() if args.png else None
    curve = client.range_test(args.run)
    if plot is not None:
        _plot_range_test(plot, args.png, curve)
    adopted = None
    if args.adopt:
        if (args.total_steps is None) == (args.schedule is None):
            raise _Fail("--adopt needs --total-steps N (OneCycleLR) or --schedule SPEC.json")
        schedule = _read_json(args.schedule) if args.schedule else None
        if schedule is not None and not isinstance(schedule, dict):
            raise _Fail(f"{args.schedule}: expected a JSON object (a schedule node)")
        adopted = adopt(
            client,
            args.run,
            args.adopt,
            rule=args.rule,
            total_steps=args.total_steps,
            schedule=schedule,
        )
    if args.json:
        if adopted is not None:
            return {"range_test": curve, "adopted": adopted.run}
        return curve
    steps, lrs = curve["steps"], curve["lr"]
    marks: dict[int, list[str]] = {}
    for rule in RULES:
        at = curve["suggested_steps"].get(rule)
        if at is not None:
            marks.setdefault(at, []).append(rule)
    if curve["stopped_at"] is not None:
        marks.setdefault(curve["stopped_at"], []).append("stop")
    # Compact: about --rows evenly spaced points, plus every marked one.
    n = len(steps)
    every = max(1, math.ceil(n / args.rows)) if n else 1
    keep = sorted({i for i in range(0, n, every)} | {n - 1} | {steps.index(s) for s in marks})
    rows = [
        [
            steps[i],
            lrs[i],
            curve["loss"][i],
            curve["smoothed"][i],
            ",".join(marks.get(steps[i], [])),
        ]
        for i in keep
        if 0 <= i < n
    ]
    _table(["step", "lr", "loss", "smoothed", "mark"], rows, out)
    stopped = curve["stopped_at"]
    state = (
        f"diverged at step {stopped}"
        if stopped is not None
        else ("finished" if curve["finished"] else "running")
    )
    out.write(f"{n} of {curve['num_iter']} steps, {state}\n")
    for rule in RULES:
        out.write(f"{rule:>9}: {_fmt(curve['suggestions'].get(rule))}\n")
    if args.png:
        out.write(f"wrote {args.png}\n")
    if adopted is not None:
        verb = "created" if adopted.created else "exists (same spec)"
        out.write(
            f"run {args.adopt} {verb}: {args.rule} = {_fmt(curve['suggestions'].get(args.rule))}\n"
        )
    return None


def _plot_range_test(plt: Any, path: str, curve: Mapping[str, Any]) -> None:
    def num(values: Sequence[Any]) -> list[float]:
        return [float(v) for v in values]  # float("NaN") reads the wire's strings too

    fig, ax = plt.subplots(figsize=(8, 4.6))
    lrs = num(curve["lr"])
    ax.plot(lrs, num(curve["loss"]), color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, num(curve["smoothed"]), linewidth=1.6, label="smoothed loss")
    colors = {"steepest": "tab:red", "valley": "tab:green", "minimum": "tab:purple"}
    for rule, color in colors.items():
        value, at = curve["suggestions"].get(rule), curve["suggested_steps"].get(rule)
        if value is None or at is None:
            continue
        i = curve["steps"].index(at)
        ax.axvline(float(value), color=color, linestyle="--", linewidth=1)
        ax.scatter(
            [lrs[i]],
            [float(curve["smoothed"][i])],
            color=color,
            zorder=3,
            label=f"{rule} {value:.3g}",
        )
    if curve["stopped_at"] is not None and curve["stopped_at"] in curve["steps"]:
        i = curve["steps"].index(curve["stopped_at"])
        ax.scatter(
            [lrs[i]],
            [float(curve["smoothed"][i])],
            marker="x",
            color="black",
            zorder=3,
            label=f"stop (step {curve['stopped_at']})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(curve.get("metric", "loss"))
    ax.set_title(f"range test {curve['run']}")
    ax.grid(True, alpha=0.3, which="both")
    if lrs:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise _Fail(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        # In subcommands SUPPRESS keeps an option given before the subcommand.
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--url",
        default=default(None),
        help="server URL (default: $LRSERVE_URL or %(prog)s's default http://127.0.0.1:8000)",
    )
    parser.add_argument("--token", default=default(None), help="bearer token ($LRSERVE_TOKEN)")
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print the JSON answer"
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=default(None), help="request timeout in seconds"
    )
    parser.add_argument(
        "--retries",
        type=_nonneg,
        default=default(None),
        help="retries on connection errors and 502/503/504 (default 3)",
    )


Command = Callable[[Client, argparse.Namespace, TextIO], Any]


def _group_arguments(parser: argparse.ArgumentParser, lr_note: str) -> None:
    """``--lr`` / ``--group``: the groups for a SPEC.json that is a single schedule node."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--lr",
        type=float,
        help=f"a single node's one group 'default' starts at this lr ({lr_note})",
    )
    which.add_argument(
        "--group",
        dest="group_lr",
        action="append",
        metavar="NAME=LR",
        help="a group for a single node, or for a body without groups (repeat)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``lrserve`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lrserve",
        description="lrserve: learning-rate schedules as a service.",
        epilog="exit codes: 0 ok, 1 the server answered with an error, 2 usage or "
        "configuration error, 3 the server cannot be reached",
    )
    parser.add_argument("--version", action="version", version=f"lrserve {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)

    def command(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    sub.add_parser(
        "serve",
        help="run the server (needs lrserve[server]); see `lrserve serve --help`",
        add_help=False,
    )

    p = command("runs", _cmd_runs, "list runs")
    p.add_argument("--limit", type=_positive, help="runs per page")
    p.add_argument("--cursor", help="continue from this cursor")
    p.add_argument("--all", action="store_true", help="follow cursors to the last page")
    p.add_argument(
        "--status",
        action="append",
        help="only runs with this status: running, idle or finished (repeat or comma list)",
    )
    p.add_argument(
        "--search", "-q", help="case-insensitive substring of the run id or a metadata value"
    )
    p.add_argument("--tag", action="append", help="only runs with this tag (repeat: all of them)")
    p.add_argument(
        "--sort",
        choices=["id", "-id", "created", "-created", "updated", "-updated", "step", "-step"],
        help="order (default id); descending with '-' in front, written --sort=-created",
    )

    p = command("show", _cmd_show, "show a run: spec, version, steps, state, overrides")
    p.add_argument("run")

    p = command("lr", _cmd_lr, "learning rates (and momentum, ...) at a step or over a window")
    p.add_argument("run")
    p.add_argument("--step", type=_nonneg, help="step (default: the run's current step)")
    p.add_argument("--start", type=_nonneg, help="window start (with --count)")
    p.add_argument("--count", type=_positive, help="window length: print a table of steps")
    p.add_argument("--rows", type=_positive, default=20, help="rows shown (default 20)")

    p = command("events", _cmd_events, "a run's events")
    p.add_argument("run")
    p.add_argument("--after", type=_nonneg, help="only events after this sequence number")

    p = command(
        "metrics", _cmd_metrics, "a run's reported values of one metric; without NAME its names"
    )
    p.add_argument("run")
    p.add_argument("name", nargs="?", help="the metric (default: list the names reported)")

    p = command("preview", _cmd_preview, "values of a schedule spec without creating a run")
    p.add_argument(
        "spec", metavar="SPEC.json", help="a run body or a single schedule node ('-': stdin)"
    )
    _group_arguments(p, "default 1 for a single node: the values are its factors")
    p.add_argument(
        "--steps",
        type=_positive,
        default=100,
        help=f"number of steps (default 100; over {MAX_WINDOW:,} the server decimates them)",
    )
    p.add_argument("--start", type=_nonneg, default=0, help="first step (default 0)")
    p.add_argument("--rows", type=_positive, default=20, help="rows shown (default 20)")
    p.add_argument("--png", metavar="FILE", help="also plot every group's values to FILE (PNG)")

    p = command("report", _cmd_report, "report metrics for a step (as a trainer does)")
    p.add_argument("run")
    p.add_argument("values", nargs="*", metavar="name=value")
    p.add_argument("--step", type=_nonneg, required=True)
    p.add_argument("--rank", type=_nonneg, default=0)
    p.add_argument("--wait", type=_seconds, help="wait up to this long for every rank")

    p = command("create", _cmd_create, "create a run from a run body (idempotent)")
    p.add_argument("run")
    p.add_argument(
        "spec", metavar="SPEC.json", help="a run body or a single schedule node ('-': stdin)"
    )
    _group_arguments(p, "needed for a single node")

    p = command("delete", _cmd_delete, "delete a run")
    p.add_argument("run")
    p.add_argument("--missing-ok", action="store_true", help="no error if it does not exist")

    p = command("override", _cmd_override, "scale or set a value from a step on; withdraw one")
    p.add_argument("run")
    p.add_argument(
        "--from-step",
        type=_nonneg,
        help="first step of the change (with --withdraw: first step without the override; "
        "default the earliest step every trainer is guaranteed to see)",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=float, help="multiply the scheduled value by this")
    how.add_argument("--set", type=float, help="replace the scheduled value by this")
    how.add_argument(
        "--withdraw", type=_positive, metavar="N", help="withdraw override N (see `show`)"
    )
    p.add_argument("--group", action="append", help="group name (repeat; default all)")
    p.add_argument("--field", default="lr", help="field (default lr)")
    p.add_argument("--note", help="why (recorded in the event)")

    p = command("amend", _cmd_amend, "change a run's schedule from a step on")
    p.add_argument("run")
    p.add_argument(
        "spec",
        metavar="SPEC.json",
        help="a schedule node, or {schedule, group_schedules, param_schedules} ('-': stdin)",
    )
    p.add_argument("--from-step", type=_nonneg, required=True, help="first amended step")
    p.add_argument(
        "--restart", action="store_true", help="the new schedule counts its steps from there"
    )
    p.add_argument(
        "--base",
        choices=["initial", "current"],
        default="initial",
        help="start from the groups' own values (default) or from those in force then",
    )
    p.add_argument("--note", help="why (recorded in the event)")

    p = command("rewind", _cmd_rewind, "take a run back to a step (restart from a checkpoint)")
    p.add_argument("run")
    p.add_argument("--to-step", type=_nonneg, required=True, help="the checkpoint's step")
    p.add_argument("--key", help="idempotency key: the same key again changes nothing")
    p.add_argument("--note", help="why (recorded in the event)")

    p = command(
        "range-test", _cmd_range_test, "a range test's curve and suggested rates; adopt one"
    )
    p.add_argument("run")
    p.add_argument("--rows", type=_positive, default=20, help="curve rows shown (default 20)")
    p.add_argument("--png", metavar="FILE", help="plot loss against lr (log axis) to FILE")
    p.add_argument("--adopt", metavar="NEW_RUN", help="create the training run NEW_RUN from it")
    p.add_argument(
        "--rule",
        choices=["steepest", "valley", "minimum"],
        default="steepest",
        help="which suggestion --adopt uses (default steepest)",
    )
    p.add_argument("--total-steps", type=_positive, help="--adopt: OneCycleLR over N steps")
    p.add_argument(
        "--schedule", metavar="SPEC.json", help="--adopt: this schedule from the suggested rates"
    )
    return parser


def _serve(argv: list[str], err: TextIO) -> int:
    try:
        from service.cli import serve_main

        return serve_main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _SERVER_MODULES:
            raise
        err.write(
            f"lrserve serve: the server is not installed ({exc.name} is missing); "
            "install lrserve[server]: pip install 'lrserve[server]'\n"
        )
        return EXIT_USAGE


def _problem_json(err: APIError) -> dict[str, Any]:
    problem: dict[str, Any] = {
        "type": err.type,
        "title": err.title,
        "status": err.status,
        "detail": err.detail,
    }
    if err.errors:
        problem["errors"] = err.errors
    return {"error": problem}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lrserve`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    out, err = sys.stdout, sys.stderr
    if args_list[:1] == ["serve"]:
        return _serve(args_list[1:], err)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(args_list)
        # argparse hands out positionals greedily: in `report RUN --step 3 loss=1` the
        # metrics come after an option and arrive here; they belong to `values`.
        if args.command == "report" and extra and not any(e.startswith("-") for e in extra):
            args.values = [*args.values, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "serve":  # global options before `serve` make no sense
        err.write("lrserve: give the server's options after `serve`: lrserve serve --help\n")
        return EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(err)
        return EXIT_USAGE
    try:
        options: dict[str, Any] = {"token": args.token, "timeout": args.timeout}
        if args.retries is not None:
            options["max_retries"] = args.retries
        with Client(args.url, **options) as client:
            result = args.func(client, args, out)
        if args.json and result is not None:
            out.write(json.dumps(result, indent=2) + "\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (`lrserve show RUN | head`): what it wanted was printed.
        _silence_stdout()
        return EXIT_OK
    except (_Fail, UsageError) as exc:
        err.write(f"lrserve {args.command}: {exc}\n")
        return EXIT_USAGE
    except APIError as exc:
        if args.json:
            out.write(json.dumps(_problem_json(exc), indent=2) + "\n")
        err.write(f"lrserve {args.command}: error: {exc}\n")
        return EXIT_API
    except TransportError as exc:
        err.write(f"lrserve {args.command}: {exc}\n")
        return EXIT_CONNECT
    return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit does not raise
    BrokenPipeError again (Python's documented recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
