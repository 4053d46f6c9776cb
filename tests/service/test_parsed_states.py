"""A plateau run's large state is parsed once, not per report (service/runs/states.py).

Hundreds of reductions through the real report transaction on a real SQLite file: after each
report the parsed state a reader gets for the stored text is exactly what ``json.loads`` of
that text gives (types included: the report primed the cache with the state it wrote), the
reports after the first parse no state at all, and the values are still torch's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import torch

from service.runs.model import RunSpec
from service.runs.service import Runs
from service.runs.states import CACHED_FROM_CHARS, STATES, parse_state
from service.store import open_store

BASE = [0.1, 0.01]
FACTOR = 0.999
REPORTS = 300


def spec() -> dict[str, Any]:
    return {
        "groups": [{"name": "g0", "lr": BASE[0]}, {"name": "g1", "lr": BASE[1]}],
        "schedule": {
            "type": "ReduceLROnPlateau",
            "metric": "loss",
            "factor": FACTOR,
            "patience": 0,
        },
    }


def torch_lrs(losses: list[float]) -> list[list[float]]:
    """torch's lr per group at steps ``0 .. len(losses)`` after ``losses[s]`` at step ``s``."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASE]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, BASE, strict=True)])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=FACTOR, patience=0)
    out = [[g["lr"] for g in opt.param_groups]]
    for loss in losses:
        sched.step(loss)
        out.append([g["lr"] for g in opt.param_groups])
    return out


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (a tuple is not a list here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b or (a != a and b != b))


def test_a_large_state_is_parsed_once_and_stays_exact(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    runs = Runs(store)
    losses = [1.0 + i for i in range(REPORTS)]  # worse every step: a reduction every step

    async def scenario() -> tuple[list[int], int]:
        await runs.create("big", RunSpec.model_validate(spec()))
        misses: list[int] = []
        checked = 0
        for step, loss in enumerate(losses):
            await runs.report("big", step, 0, {"loss": loss})
            record = store.get_run("big")
            assert record is not None
            if len(record.state) >= CACHED_FROM_CHARS:
                misses.append(STATES.misses)
                assert same(parse_state(record.state), json.loads(record.state)), step
                checked += 1
        return misses, checked

    try:
        misses, checked = asyncio.run(scenario())
        assert checked > 100, "the state never grew past the cached size: test too small"
        # Every report after the state got large found the state it reads already parsed:
        # the one before it had written it (and primed the cache with it).
        assert misses[-1] == misses[0], (misses[0], misses[-1])

        async def window() -> Any:
            known = await runs.version("big")
            return await runs.window("big", 0, REPORTS + 1, known)

        got = asyncio.run(window()).values
        expected = torch_lrs(losses)
        for i, name in enumerate(("g0", "g1")):
            column = got[name]["lr"]
            for step in range(REPORTS + 1):
                assert abs(column[step] - expected[step][i]) <= 1e-12 * expected[step][i], (
                    name,
                    step,
                )
    finally:
        store.close()
