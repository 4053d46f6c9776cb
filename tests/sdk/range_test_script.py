"""Run ``lrserve.range_test.range_test`` in gloo processes (not a test module).

    python range_test_script.py CONFIG_JSON

CONFIG keys: url, run, world_size, chief (bool), num_iter, end_lr, out (a path with
``{rank}``). Every rank builds the same DDP model (seed 0) but draws its own data (seed
``rank``, targets scaled by ``1 + rank``), so the ranks' losses differ at every step. Each rank
writes the rates it trained with at every step, the curve, and whether the model and the
optimizer were restored exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def same_state(a: Any, b: Any) -> bool:
    """Exact equality of two (nested) state dicts, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def run(rank: int, cfg: dict[str, Any]) -> None:
    import copy

    from lrserve.range_test import range_test

    world = int(cfg["world_size"])
    dist.init_process_group("gloo", init_method=cfg["init"], rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(
        [
            {"params": net[0].parameters(), "lr": 1e-4, "name": "body"},
            {"params": net[2].parameters(), "lr": 1e-3, "name": "head"},
        ],
        momentum=0.9,
    )
    # A few steps first, so the optimizer has momentum buffers that must come back.
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        x = torch.randn(16, 8, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())

    gen = torch.Generator().manual_seed(rank)
    w = torch.randn(8, 1, generator=gen)
    xs = torch.randn(256, 8, generator=gen)
    ys = xs @ w * (1 + rank) + 0.1 * torch.randn(256, 1, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16)
    seen: list[list[float]] = []

    def step_fn(batch: Any) -> torch.Tensor:
        seen.append([float(group["lr"]) for group in opt.param_groups])
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    found = range_test(
        model,
        opt,
        loader,
        run=cfg["run"],
        url=cfg["url"],
        step_fn=step_fn,
        start_lr=[1e-5, 1e-4],
        end_lr=[cfg["end_lr"], 10 * cfg["end_lr"]],
        num_iter=int(cfg["num_iter"]),
        accumulation_steps=2,
        chief=bool(cfg["chief"]),
    )
    out = {
        "seen": seen,
        "iterations": found.iterations,
        "curve": found.curve,
        "model_restored": same_state(model.state_dict(), before_model),
        "optimizer_restored": same_state(opt.state_dict(), before_opt),
    }
    with open(cfg["out"].replace("{rank}", str(rank)), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # A file store, not tcp://: rank 0 would host a TCPStore, and a rank still tearing its
    # process group down when rank 0 exits aborts in torch (chief_metrics_script.py), after
    # the test's work is all done; a free port taken between the probe and the bind also failed.
    store = Path(cfg["out"]).parent / "dist-init"
    store.unlink(missing_ok=True)
    cfg["init"] = f"file://{store}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(run, args=(cfg,), nprocs=int(cfg["world_size"]), join=True)


if __name__ == "__main__":
    main()
