"""The SDK's range-test helper against a live server, real torch and real gloo processes.

- End to end against torch-lr-finder: the same model, data and optimizer put through
  ``torch_lr_finder.LRFinder.range_test`` and through ``lrserve.range_test.range_test`` (with
  gradient accumulation, and with autocast + a GradScaler) give the same rates, the same
  smoothed losses and the same stop step; the model and the optimizer come back exactly.
- Two gloo processes whose losses differ (every-rank and chief mode): identical rates at every
  step on both ranks, one stop step, model and optimizer restored bit for bit.
- A real small model on synthetic data: the suggestion lies where the smoothed loss falls
  fastest, below the rate where SGD diverges, and a run adopted from it converges.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import lrserve
import numpy as np
import pytest
import torch
import torch_lr_finder  # the oracle (a dev requirement: never skipped)
from lrserve.range_test import adopt, adopted_spec, range_test, suggested_rates

from tests.sdk.range_test_script import same_state
from tests.sdk.torch_support import run_python


def regression(n: int = 512, d: int = 10, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = x @ w + 0.05 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def mlp(d: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def _finder(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loader: Any,
    amp: dict[str, Any] | None,
    scaler: Any,
    **kw: Any,
) -> dict[str, list[float]]:
    finder = torch_lr_finder.LRFinder(
        model,
        opt,
        torch.nn.functional.mse_loss,
        device="cpu",
        amp_backend="torch" if amp else None,
        amp_config=amp,
        grad_scaler=scaler,
    )
    finder.range_test(loader, **kw)
    finder.reset()
    history: dict[str, list[float]] = finder.history
    return history


@pytest.mark.parametrize(
    ("accumulation", "amp"),
    [(1, False), (3, False), (2, True)],
    ids=["plain", "accumulate-3", "amp-accumulate-2"],
)
def test_same_curve_as_torch_lr_finder_end_to_end(
    live_server: Any, accumulation: int, amp: bool
) -> None:
    data = regression()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16} if amp else None
    kw = {"start_lr": 1e-5, "end_lr": 10.0, "num_iter": 80, "accumulation_steps": accumulation}

    ref_model = mlp()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_scaler = torch.amp.GradScaler("cpu") if amp else None
    history = _finder(ref_model, ref_opt, loader, autocast, ref_scaler, **kw)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu") if amp else None
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    run = f"rt-e2e-{accumulation}-{amp}"
    found = range_test(
        model,
        opt,
        loader,
        run=run,
        url=live_server.url,
        criterion=torch.nn.functional.mse_loss,
        amp=autocast,
        grad_scaler=scaler,
        **kw,
    )
    curve = found.curve
    n = len(history["loss"])
    assert n < 80, "this test diverges before its last step"
    assert found.iterations == n and curve["stopped_at"] == n - 1
    assert curve["lr"] == history["lr"]
    assert curve["smoothed"] == history["loss"]
    # The helper restored what it changed (torch-lr-finder's reset()).
    assert same_state(model.state_dict(), before[0])
    assert same_state(opt.state_dict(), before[1])
    assert found.suggestions["steepest"] is not None


@pytest.mark.slow
def test_two_gloo_ranks_with_different_losses(live_server: Any, tmp_path: Path) -> None:
    results = {}
    for chief in (False, True):
        run = f"rt-ddp-{'chief' if chief else 'all'}"
        cfg = {
            "url": live_server.url,
            "run": run,
            "world_size": 2,
            "chief": chief,
            "num_iter": 120,
            "end_lr": 5.0,
            "out": str(tmp_path / f"{run}-rank{{rank}}.json"),
        }
        script = Path(__file__).with_name("range_test_script.py")
        proc = run_python(script, json.dumps(cfg), timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        ranks = [json.loads((tmp_path / f"{run}-rank{r}.json").read_text()) for r in (0, 1)]
        r0, r1 = ranks
        # Identical rates on both ranks at every step (two accumulated batches per step).
        assert r0["seen"] == r1["seen"] and len(r0["seen"]) == 2 * r0["iterations"]
        # The same stop step, before the last step: the test diverged for both at once.
        assert r0["iterations"] == r1["iterations"] < 120
        assert r0["curve"] == r1["curve"]
        stopped = r0["curve"]["stopped_at"]
        assert stopped == r0["iterations"] - 1
        for r in ranks:
            assert r["model_restored"] and r["optimizer_restored"]
        # The rates were the run's: group "head" is 10x "body" at each step.
        for body, head in r0["seen"]:
            assert math.isclose(head, 10 * body, rel_tol=1e-12)
        results[chief] = r0
    # Every-rank mode: the service saw the ranks' mean; chief mode: rank 0 reported it.
    with lrserve.Client(live_server.url) as client:
        assert client.get_run("rt-ddp-all")["spec"]["world_size"] == 2
        points = client.get_metrics("rt-ddp-all", "loss")
        first = [p["value"] for p in points["points"] if p["step"] == 0]
        assert len(first) == 2 and first[0] != first[1]  # the ranks' losses differ


def test_small_model_suggestion_and_adopted_run_converge(live_server: Any) -> None:
    # Linear regression with SGD: the loss's Hessian is 2 X^T X / n; SGD diverges above
    # 2 / lambda_max of it, so a useful suggestion lies below that rate.
    data = regression(n=1024, d=10, seed=3)
    x, y = data.tensors
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    diverge_at = 2 / lam
    torch.manual_seed(1)
    model = torch.nn.Linear(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=False)
    found = range_test(
        model,
        opt,
        loader,
        run="rt-small",
        url=live_server.url,
        criterion=torch.nn.functional.mse_loss,
        start_lr=1e-5,
        end_lr=10.0,
        num_iter=100,
    )
    curve = found.curve
    steps, lr, smoothed = curve["steps"], np.array(curve["lr"]), np.array(curve["smoothed"])
    assert curve["stopped_at"] is not None  # it diverged before 10
    best = found.suggestion("steepest")
    assert 1e-3 * diverge_at < best < diverge_at
    # Where the smoothed loss falls fastest (per step of the exponential ramp): the suggested
    # point is among the steepest fifth of the trimmed curve's slopes, and the loss falls there.
    i = steps.index(curve["suggested_steps"]["steepest"])
    slopes = np.gradient(smoothed[10 : len(smoothed) - 5])
    assert slopes[i - 10] <= np.quantile(slopes, 0.2) and slopes[i - 10] < 0
    assert lr[i] == best
    rates = suggested_rates(curve, "steepest")
    assert rates == {"group0": best}

    # Adopt: OneCycleLR with max_lr = the suggestion, then train with it through the service.
    with lrserve.Client(live_server.url) as client:
        created, _ = adopt(client, "rt-small", "rt-small-train", total_steps=300)
        assert created["spec"]["schedule"]["max_lr"] == [best]
        assert created["spec"]["metadata"]["range_test"] == "rt-small"
        again = adopt(client, "rt-small", "rt-small-train", total_steps=300)
        assert not again.created  # idempotent
    torch.manual_seed(1)
    model = torch.nn.Linear(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = lrserve.torch.RemoteScheduler(opt, "rt-small-train", url=live_server.url)
    first = last = None
    batches = iter(torch.utils.data.DataLoader(data, batch_size=64, shuffle=True))
    for _ in range(300):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(torch.utils.data.DataLoader(data, batch_size=64, shuffle=True))
            xb, yb = next(batches)
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    sched.close()
    with torch.no_grad():
        last = float(torch.nn.functional.mse_loss(model(x), y))
    assert first is not None and last < 0.01 * first and last < 0.01


def test_adopted_spec_scales_groups_by_their_ratio() -> None:
    curve = {
        "run": "rt",
        "steps": [0, 1, 2],
        "lr": [1e-4, 1e-3, 1e-2],
        "groups": {"body": [1e-4, 1e-3, 1e-2], "head": [1e-3, 1e-2, 1e-1]},
        "suggestions": {"steepest": 1e-3, "valley": None, "minimum": 1e-3},
        "suggested_steps": {"steepest": 1, "valley": None, "minimum": 2},
    }
    source = {
        "groups": [{"name": "body", "lr": 1e-5, "momentum": 0.9}, {"name": "head", "lr": 1e-4}],
        "world_size": 2,
        "aggregate": "mean",
    }
    cosine = {"type": "CosineAnnealingLR", "T_max": 100}
    body = adopted_spec(source, curve, schedule=cosine)
    assert [g["lr"] for g in body["groups"]] == [1e-3, pytest.approx(1e-2, rel=1e-15)]
    assert body["groups"][0]["momentum"] == 0.9 and body["world_size"] == 2
    assert body["schedule"] == cosine
    minimum = adopted_spec(source, curve, rule="minimum", total_steps=50)
    assert minimum["schedule"]["max_lr"] == [1e-3, pytest.approx(1e-2, rel=1e-15)]
    with pytest.raises(lrserve.UsageError, match="valley"):
        adopted_spec(source, curve, rule="valley", total_steps=50)
    with pytest.raises(lrserve.UsageError, match="either"):
        adopted_spec(source, curve)


def _reported_range_test(url: str, run: str) -> None:
    """A range test run fed a falling-then-diverging loss over the wire (no torch model)."""
    from tests.schedules.test_range_test import _shape

    with lrserve.Client(url) as client:
        client.create_run(
            run,
            {
                "groups": [{"name": "body", "lr": 1e-6}, {"name": "head", "lr": 1e-5}],
                "schedule": {"type": "LRRangeTest", "end_lr": [1.0, 10.0], "num_iter": 100},
            },
        )
        for step, loss in enumerate(_shape(100, 1)):
            if client.report(run, step, {"loss": loss}).get("stop"):
                break


def test_cli_prints_plots_and_adopts(
    live_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lrserve.cli import main

    _reported_range_test(live_server.url, "rt-cli")
    png = tmp_path / "rt.png"
    code = main(["--url", live_server.url, "range-test", "rt-cli", "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with lrserve.Client(live_server.url) as client:
        curve = client.range_test("rt-cli")
    assert f"diverged at step {curve['stopped_at']}" in out
    for rule in ("steepest", "valley", "minimum"):
        assert f"{rule}: {curve['suggestions'][rule]:.6g}" in out
    marked = [line for line in out.splitlines() if line.rstrip().endswith("stop")]
    assert marked and marked[0].split()[0] == str(curve["stopped_at"])  # the stop row is shown
    # --adopt with a schedule: the groups' base rates are the suggestion, scaled per group.
    spec = tmp_path / "cosine.json"
    spec.write_text(json.dumps({"type": "CosineAnnealingLR", "T_max": 500}))
    argv = ["--url", live_server.url, "range-test", "rt-cli", "--adopt", "rt-cli-train"]
    code = main([*argv, "--rule", "valley", "--schedule", str(spec)])
    out = capsys.readouterr().out
    assert code == 0 and "run rt-cli-train created" in out, out
    with lrserve.Client(live_server.url) as client:
        groups = client.get_run("rt-cli-train")["spec"]["groups"]
    rates = suggested_rates(curve, "valley")
    assert [g["lr"] for g in groups] == [rates["body"], rates["head"]]
    assert math.isclose(rates["head"], 10 * rates["body"], rel_tol=1e-9)
    # Usage errors: exit 2 with what to give; not a range test: exit 1 with the server's detail.
    assert main([*argv]) == 2
    assert "--total-steps" in capsys.readouterr().err
    with lrserve.Client(live_server.url) as client:
        client.create_run(
            "plain",
            {"groups": [{"name": "g", "lr": 0.1}], "schedule": {"type": "StepLR", "step_size": 2}},
        )
    assert main(["--url", live_server.url, "range-test", "plain"]) == 1
    assert "LRRangeTest" in capsys.readouterr().err


def test_cli_png_without_matplotlib_names_the_package(
    live_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    import sys

    from lrserve.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code = main(["--url", live_server.url, "range-test", "x", "--png", str(tmp_path / "a.png")])
    assert code == 2
    assert "pip install 'lrserve[plot]'" in capsys.readouterr().err
