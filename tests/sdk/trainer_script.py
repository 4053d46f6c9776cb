"""A tiny trainer run in subprocesses by the resume and DDP tests (not a test module).

    python trainer_script.py CONFIG_JSON

CONFIG keys: url, run, spec (or null to attach), steps (end step), report_every,
load (checkpoint path or null), save (path or null), out (json path for the values seen),
world_size (>1: spawn that many gloo processes), chief (bool), window, sync_every,
spike_from (losses from that step on are 10 higher: a divergence), step_sleep (seconds per
step, so that a test can steer the run while it trains), rewind (RemoteScheduler's).
The metric each rank reports at step s is ``loss(s, rank)``, known to the test too. The
warnings a rank saw are written next to ``out`` (``<out>.warnings.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def loss(step: int, rank: int) -> float:
    # Improves until step 150, then plateaus: a ReduceLROnPlateau watching the mean reduces.
    return 1.0 / (1 + min(step, 150)) + 0.01 * rank


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1, "name": "backbone"},
            {"params": model[1].parameters(), "lr": 0.01, "name": "head"},
        ],
        momentum=0.9,
    )
    return model, opt


def hyper(opt: torch.optim.Optimizer) -> list[list[float]]:
    return [[float(g["lr"]), float(g["momentum"])] for g in opt.param_groups]


def train(rank: int, cfg: dict[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(rank, cfg)
    out = cfg["out"].replace("{rank}", str(rank)) + ".warnings.json"
    with open(out, "w") as f:
        json.dump([f"{w.category.__name__}: {w.message}" for w in caught], f)


def _train(rank: int, cfg: dict[str, Any]) -> None:
    from lrserve.torch import RemoteScheduler

    world = int(cfg.get("world_size", 1))
    if world > 1:
        dist.init_process_group("gloo", init_method=cfg["init"], rank=rank, world_size=world)
    model, opt = model_and_optimizer()
    try:
        sched = RemoteScheduler(
            opt,
            cfg["run"],
            url=cfg["url"],
            spec=cfg.get("spec"),
            chief=bool(cfg.get("chief")),
            window=int(cfg.get("window", 4096)),
            sync_every=int(cfg.get("sync_every", 256)),
            poll_interval=0.05,
            rewind=bool(cfg.get("rewind", True)),
        )
    except Exception as exc:
        if not cfg.get("expect_attach_error"):
            raise
        # Record what this rank saw; the test checks that every rank failed (none hung).
        with open(cfg["out"].replace("{rank}", str(rank)), "w") as f:
            json.dump({"error": f"{type(exc).__name__}: {exc}"}, f)
        if world > 1:
            # Both ranks got here (a hang would time the test out): leave together, so that no
            # rank tears the group down while the other is still reading the broadcast.
            dist.barrier()
            dist.destroy_process_group()
        return
    if cfg.get("load"):
        state = torch.load(cfg["load"], weights_only=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    seen: dict[int, list[list[float]]] = {}
    g = torch.Generator().manual_seed(rank)
    while sched.last_epoch < cfg["steps"]:
        s = sched.last_epoch
        seen[s] = hyper(opt)
        x = torch.randn(16, 4, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if s > 0 and s % cfg["report_every"] == 0:
            value = loss(s, rank) + (10.0 if s >= cfg.get("spike_from", 1 << 60) else 0.0)
            res = sched.report({"val_loss": value})
            assert res is not None, "the service is up: report must be answered"
        sched.step()
        if cfg.get("step_sleep"):
            time.sleep(float(cfg["step_sleep"]))
    seen[sched.last_epoch] = hyper(opt)
    if cfg.get("save") and rank == 0:
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, cfg["save"])
    sched.close()
    out = cfg["out"].replace("{rank}", str(rank))
    with open(out, "w") as f:
        json.dump({str(k): v for k, v in seen.items()}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    world = int(cfg.get("world_size", 1))
    if world == 1:
        train(0, cfg)
        return
    # A file store, not tcp://: rank 0 would host a TCPStore, and a rank still tearing its
    # process group down when rank 0 exits aborts in torch (chief_metrics_script.py), after
    # the test's work is all done; a free port taken between the probe and the bind also failed.
    store = Path(cfg["out"]).parent / "dist-init"
    store.unlink(missing_ok=True)
    cfg["init"] = f"file://{store}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(train, args=(cfg,), nprocs=world, join=True)


if __name__ == "__main__":
    main()
