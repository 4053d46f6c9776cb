"""Train a two-group model with learning rates served by lrserve (synthetic data).

The backbone and the head get different base rates; both follow a linear warmup into a
cosine decay, and a plateau rule halves them when the validation loss stops improving.
The schedule lives in the service; the training loop only calls ``sched.step()`` and,
at evaluation time, ``sched.report(...)``.

    python -m service &                                   # a local service on :8000
    python examples/train_two_groups.py --url http://127.0.0.1:8000

The last line printed is a JSON summary (used by tests/sdk/test_example.py).
"""

from __future__ import annotations

import argparse
import json

import lrserve.torch
import torch


def schedule(steps: int, warmup: int) -> dict[str, object]:
    """Warmup + cosine for every group, chained with a plateau reduction on val_loss."""
    return {
        "type": "ChainedScheduler",
        "schedulers": [
            {
                "type": "SequentialLR",
                "schedulers": [
                    {"type": "LinearLR", "start_factor": 0.05, "total_iters": warmup},
                    {"type": "CosineAnnealingLR", "T_max": steps - warmup, "eta_min": 1e-5},
                ],
                "milestones": [warmup],
            },
            {
                "type": "ReduceLROnPlateau",
                "metric": "val_loss",
                "factor": 0.5,
                "patience": 1,
                "threshold": 0.02,
            },
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="lrserve URL (default $LRSERVE_URL or :8000)")
    ap.add_argument("--run", default="two-groups-example", help="run id")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # Synthetic regression: a fixed random teacher plus noise (the noise is the floor the
    # validation loss plateaus on).
    g = torch.Generator().manual_seed(args.seed)
    teacher = torch.randn(16, 1, generator=g)
    x_val = torch.randn(512, 16, generator=g)
    y_val = torch.tanh(x_val) @ teacher + 0.1 * torch.randn(512, 1, generator=g)

    torch.manual_seed(args.seed)
    backbone = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32)
    )
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.AdamW(
        [
            {"params": backbone.parameters(), "lr": 1e-3, "name": "backbone"},
            {"params": head.parameters(), "lr": 1e-2, "name": "head"},
        ]
    )
    spec = {"schedule": schedule(args.steps, args.warmup), "metadata": {"example": "two groups"}}
    reductions = 0
    with lrserve.torch.RemoteScheduler(opt, args.run, url=args.url, spec=spec) as sched:
        for _ in range(args.steps):
            x = torch.randn(64, 16, generator=g)
            y = torch.tanh(x) @ teacher + 0.1 * torch.randn(64, 1, generator=g)
            loss = torch.nn.functional.mse_loss(head(backbone(x)), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()  # the next step's rates, from the prefetched window
            if sched.last_epoch % args.eval_every == 0:
                with torch.no_grad():
                    val = torch.nn.functional.mse_loss(head(backbone(x_val)), y_val).item()
                res = sched.report({"val_loss": val})  # the one place it talks
                reduced = bool(res and res["decision"] and res["decision"].get("reduced"))
                reductions += reduced
                lrs = ", ".join(f"{lr:.2e}" for lr in sched.get_last_lr())
                note = "  reduced" if reduced else ""
                print(f"step {sched.last_epoch:5d}  val_loss {val:.4f}  lr [{lrs}]{note}")
        summary = {
            "run": args.run,
            "steps": sched.last_epoch,
            "final_lr": sched.get_last_lr(),
            "val_loss": val,
            "reductions": reductions,
            "version": sched.version,
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
