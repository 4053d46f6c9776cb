"""Chief-mode reports from several gloo ranks (run by test_ddp.py; not a test module).

    python chief_metrics_script.py CONFIG_JSON     # keys: url, world_size (3), out

Every rank builds one chief-mode ``RemoteScheduler`` per aggregate mode (run
``chief-<mode>``) and, at step ``i + 1``, reports ``ROWS[i][rank]``: rank 1 as tensors,
rank 2 as numpy scalars, so that rank 0 combines what the ranks really hand in. Then
come reports that must fail on every rank (none may hang): an invalid value on one rank,
and a metric the service refuses. Each rank writes what it saw to ``out``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

NAN, INF = math.nan, math.inf
MODES = ("mean", "min", "max", "rank0")
ROWS: list[list[dict[str, float | None]]] = [
    [{"val_loss": 1.0}, {"val_loss": NAN}, {"val_loss": 3.0}],  # issue 7: NaN, not 2.0
    [{"val_loss": None}, {"val_loss": 2.0}, {"val_loss": None}],
    [{"val_loss": 1.0, "acc": 0.5}, {"val_loss": INF}, {"val_loss": 2.0, "extra": -INF}],
    [{"val_loss": INF}, {"val_loss": -INF}, {"val_loss": 1.0}],
    [{"val_loss": None}, {"only1": 0.25}, {"only1": None}],
    [{"val_loss": None}, {"val_loss": None}, {"val_loss": None}],
    [{"val_loss": 0.5, "acc": 0.1}, {"val_loss": 0.7, "acc": 0.3}, {"val_loss": 0.9, "acc": NAN}],
]
SPEC = {"schedule": {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 0}}


def as_handed_in(rank: int, values: dict[str, float | None]) -> dict[str, Any]:
    if rank == 1:
        return {
            k: None if v is None else torch.tensor(v, dtype=torch.float64)
            for k, v in values.items()
        }
    if rank == 2:
        return {k: None if v is None else np.float64(v) for k, v in values.items()}
    return dict(values)


def train(rank: int, cfg: dict[str, Any]) -> None:
    from lrserve.torch import RemoteScheduler

    world = int(cfg["world_size"])
    dist.init_process_group("gloo", init_method=cfg["init"], rank=rank, world_size=world)
    scheds = []
    for mode in MODES:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheds.append(
            RemoteScheduler(
                opt, f"chief-{mode}", url=cfg["url"], spec=SPEC, chief=True, aggregate=mode
            )
        )
    seen: dict[str, Any] = {"answers": [], "errors": []}
    for row in ROWS:
        for sched in scheds:
            sched.step()
            res = sched.report(as_handed_in(rank, row[rank]))
            seen["answers"].append(res is not None)
    sched = scheds[0]
    bad: list[dict[str, Any]] = [{"val_loss": 1.0} for _ in range(world)]
    bad[1] = {"val_loss": "oops"}  # rank 1's mistake
    for metrics in (bad[rank], {"": 1.0}):  # then a name the service refuses (422)
        sched.step()
        try:
            sched.report(metrics)
            seen["errors"].append(None)
        except Exception as exc:
            seen["errors"].append(f"{type(exc).__name__}: {exc}")
    sched.step()
    seen["after"] = sched.report({"val_loss": 0.1}) is not None  # still in step
    for s in scheds:
        s.close()
    with open(cfg["out"].replace("{rank}", str(rank)), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # A file store, not tcp://: rank 0 would host a TCPStore, and a rank still tearing its
    # process group down when rank 0 exits aborts in torch ("terminate called without an
    # active exception", about one run in eight here), after the test's work is all done.
    store = Path(cfg["out"]).parent / "dist-init"
    store.unlink(missing_ok=True)
    cfg["init"] = f"file://{store}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(train, args=(cfg,), nprocs=int(cfg["world_size"]), join=True)


if __name__ == "__main__":
    main()
