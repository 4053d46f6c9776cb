"""torch as the oracle for the service tests, and small request helpers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch


def new_id(prefix: str = "run") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def torch_lrs(
    make: Callable[[torch.optim.Optimizer], Any],
    lrs: Sequence[float],
    n: int,
    momentum: float = 0.9,
) -> list[list[float]]:
    """lr per group after 0..n-1 ``step()`` calls of the torch scheduler ``make(opt)``."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)], momentum=momentum
    )
    sched = make(opt)
    out = [[g["lr"] for g in opt.param_groups]]
    for _ in range(n - 1):
        opt.step()
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return [list(col) for col in zip(*out, strict=True)]


def close(a: Sequence[float], b: Sequence[float], rtol: float = 1e-12) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= rtol * max(abs(y), 1e-300) for x, y in zip(a, b, strict=True)
    )


COSINE_SPEC: dict[str, Any] = {
    "groups": [
        {"name": "backbone", "lr": 0.0001, "momentum": 0.9},
        {"name": "head", "lr": 0.001},
    ],
    "schedule": {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.01, "total_iters": 50},
            {"type": "CosineAnnealingLR", "T_max": 950, "eta_min": 1e-6},
        ],
        "milestones": [50],
    },
    "metadata": {"model": "resnet50"},
}


def cosine_torch(opt: torch.optim.Optimizer) -> Any:
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    return SequentialLR(
        opt,
        [
            LinearLR(opt, start_factor=0.01, total_iters=50),
            CosineAnnealingLR(opt, T_max=950, eta_min=1e-6),
        ],
        milestones=[50],
    )


def plateau_spec(world_size: int = 1, aggregate: str = "mean", patience: int = 1) -> dict[str, Any]:
    return {
        "groups": [{"name": "g0", "lr": 0.1}, {"name": "g1", "lr": 0.01}],
        "schedule": {
            "type": "ReduceLROnPlateau",
            "metric": "val_loss",
            "factor": 0.5,
            "patience": patience,
        },
        "world_size": world_size,
        "aggregate": aggregate,
    }
