"""A large stored state is parsed once, not per read (service/runs/states.py).

Since schema v5 a state's reductions are rows of their own and its text stays small; a state
stored before that holds them inline. Hundreds of reductions through the real report
transaction on a real SQLite file, then the row rewritten as an older version left it: the
parsed state a reader gets for the text is exactly what ``json.loads`` gives (types included),
a second reader parses nothing, the values are torch's, and the next report moves the
reductions to rows.
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


def test_a_state_stored_inline_is_parsed_once_and_moves_to_rows(tmp_path: Path) -> None:
    """A state stored before schema v5 holds its reductions inline: it is read as it is (its
    text parsed once, shared by every reader), and the next report moves them to rows."""
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    runs = Runs(store)
    losses = [1.0 + i for i in range(REPORTS)]  # worse every step: a reduction every step
    expected = torch_lrs(losses)

    async def seed() -> None:
        await runs.create("big", RunSpec.model_validate(spec()))
        for step, loss in enumerate(losses):
            await runs.report("big", step, 0, {"loss": loss})

    async def window() -> Any:
        known = await runs.version("big")
        return await runs.window("big", 0, REPORTS + 1, known)

    def check(values: Any) -> None:
        for i, name in enumerate(("g0", "g1")):
            column = values[name]["lr"]
            for step in range(REPORTS + 1):
                assert abs(column[step] - expected[step][i]) <= 1e-12 * expected[step][i], (
                    name,
                    step,
                )

    try:
        asyncio.run(seed())
        whole = asyncio.run(runs.get("big")).state
        # The row as a version before v5 stored it: every reduction inline in the text.
        with store.transaction("big") as tx:
            assert tx is not None
            tx.run.state = json.dumps(whole)
            tx.delete_reductions()
            tx.save()
        inline = store.get_run("big")
        assert inline is not None and len(inline.state) >= CACHED_FROM_CHARS
        STATES.clear()
        runs.cache.clear()
        assert same(parse_state(inline.state), json.loads(inline.state))
        misses = STATES.misses
        check(asyncio.run(window()).values)
        assert STATES.misses == misses, "the reader parsed the stored text again"
        # The next report stores the state as v5 does: a small text and one row per reduction.
        asyncio.run(runs.report("big", REPORTS, 0, {"loss": 0.5}))
        moved = store.get_run("big")
        assert moved is not None and len(moved.state) < 300, moved.state
        path = next(iter(whole))
        rows = store.reductions("big", path, 0, 0, 1 << 40)
        assert [json.loads(r) for r in rows] == whole[path]["reductions"]
        runs.cache.clear()
        check(asyncio.run(window()).values)
    finally:
        store.close()
