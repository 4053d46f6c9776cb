"""Helpers for the lrserve.torch tests: torch's own schedulers as the oracle.

``torch_scheduler(optimizer, node)`` builds the torch scheduler a spec node names, with
the same arguments, so every expected value in these tests comes from torch itself.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim import lr_scheduler

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients"

WARMUP_COSINE: dict[str, Any] = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 200},
        {"type": "CosineAnnealingLR", "T_max": 2800, "eta_min": 1e-6},
    ],
    "milestones": [200],
}


def torch_scheduler(optimizer: torch.optim.Optimizer, node: dict[str, Any]) -> Any:
    """The torch scheduler a (non-plateau) spec node describes."""
    args = {k: v for k, v in node.items() if k != "type"}
    cls = getattr(lr_scheduler, node["type"])
    if node["type"] == "SequentialLR":
        children = [torch_scheduler(optimizer, c) for c in args.pop("schedulers")]
        return cls(optimizer, children, **args)
    if node["type"] == "ChainedScheduler":
        children = [torch_scheduler(optimizer, c) for c in args.pop("schedulers")]
        return cls(children, optimizer=optimizer)
    return cls(optimizer, **args)


def two_group_model(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)


def sgd(lrs: Sequence[float] = (0.1, 0.01), momentum: float = 0.9) -> torch.optim.SGD:
    modules = [torch.nn.Linear(2, 2) for _ in lrs]
    return torch.optim.SGD(
        [
            {"params": m.parameters(), "lr": lr, "name": f"g{i}"}
            for i, (m, lr) in enumerate(zip(modules, lrs, strict=True))
        ],
        momentum=momentum,
    )


def rel_close(a: float, b: float, rel: float = 1e-12) -> bool:
    return a == b or math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


def hyper(optimizer: torch.optim.Optimizer) -> list[tuple[float, ...]]:
    """(lr, momentum or beta1) of every group, as floats."""
    out: list[tuple[float, ...]] = []
    for g in optimizer.param_groups:
        m = g["betas"][0] if "betas" in g else g.get("momentum", float("nan"))
        out.append((float(g["lr"]), float(m)))
    return out


def assert_same(
    actual: Sequence[Sequence[float]], expected: Sequence[Sequence[float]], where: str
) -> None:
    for ga, ge in zip(actual, expected, strict=True):
        for a, e in zip(ga, ge, strict=True):
            if math.isnan(a) and math.isnan(e):
                continue
            assert rel_close(a, e), f"{where}: {actual} != {expected}"


def server_aggregate(reports: Sequence[tuple[int, Any]], how: str) -> dict[str, Any]:
    """What the server computes: ``service.runs.model.aggregate`` (imported when called)."""
    try:
        from service.runs.model import aggregate
    except ImportError:  # moved by a refactoring: look for it under service.runs
        import importlib
        import pkgutil

        import service.runs

        for info in pkgutil.iter_modules(service.runs.__path__):
            module = importlib.import_module(f"service.runs.{info.name}")
            aggregate = getattr(module, "aggregate", None)
            if callable(aggregate):
                break
        else:  # pragma: no cover - it is gone: the SDK tests that compare with it must change
            raise ImportError("no aggregate() under service.runs") from None
    return aggregate(reports, how)  # type: ignore[no-any-return]


def sdk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CLIENTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("LRSERVE_URL", None)
    env.pop("LRSERVE_TOKEN", None)
    return env


def run_python(
    code_or_path: str | Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run a script (a path) or code (a string) in a fresh interpreter that imports lrserve."""
    cmd = (
        [sys.executable, str(code_or_path)]
        if isinstance(code_or_path, Path)
        else [sys.executable, "-c", code_or_path]
    )
    return subprocess.run(
        [*cmd, *args], env=sdk_env(), capture_output=True, text=True, timeout=timeout, cwd=str(ROOT)
    )


def restart_same_port(server: Any, server_factory: Callable[..., Any]) -> Any:
    """Start the server again on the same database and port (after stop() or kill())."""
    port = server.url.rsplit(":", 1)[1]
    return server_factory(database=server.database, args=["--port", port])


# Backbone: warmup + cosine; head: plateau on the (rank-averaged) validation loss.
TWO_GROUP_SPEC: dict[str, Any] = {
    "schedule": {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.01, "total_iters": 50},
            {"type": "CosineAnnealingLR", "T_max": 250, "eta_min": 1e-4},
        ],
        "milestones": [50],
    },
    "group_schedules": {
        "head": {"type": "ReduceLROnPlateau", "metric": "val_loss", "factor": 0.5, "patience": 2}
    },
    "aggregate": "mean",
}


def two_group_expected(
    steps: int, report_every: int, world_size: int
) -> dict[int, list[list[float]]]:
    """What torch gives for TWO_GROUP_SPEC with trainer_script's losses: {step: [[lr, m], ...]}."""
    from tests.sdk.trainer_script import loss, model_and_optimizer

    _, backbone_opt = model_and_optimizer()
    backbone_opt.param_groups.pop(1)
    warm = torch_scheduler(backbone_opt, TWO_GROUP_SPEC["schedule"])
    _, head_opt = model_and_optimizer()
    head_opt.param_groups.pop(0)
    plateau = lr_scheduler.ReduceLROnPlateau(head_opt, factor=0.5, patience=2)
    out = {}
    for s in range(steps + 1):
        out[s] = [
            [float(backbone_opt.param_groups[0]["lr"]), 0.9],
            [float(head_opt.param_groups[0]["lr"]), 0.9],
        ]
        if s > 0 and s % report_every == 0:
            plateau.step(sum(loss(s, r) for r in range(world_size)) / world_size)
        backbone_opt.step()
        warm.step()
    return out


def trainer(cfg: dict[str, Any], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run tests/sdk/trainer_script.py with ``cfg``; fails the test with its output on error."""
    import json

    proc = run_python(
        Path(__file__).with_name("trainer_script.py"), json.dumps(cfg), timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def load_seen(path: Path) -> dict[int, list[list[float]]]:
    import json

    return {int(k): v for k, v in json.loads(path.read_text()).items()}
