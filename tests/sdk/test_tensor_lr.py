"""Tensor learning rates (and betas) are written in place; compiled steps do not recompile."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lrserve.torch import RemoteScheduler, groups_from_optimizer
from torch._dynamo.utils import counters

from tests.sdk.torch_support import WARMUP_COSINE, assert_same, hyper, torch_scheduler


def _adamw(dtype: torch.dtype, tensor_betas: bool = False) -> torch.optim.AdamW:
    torch.manual_seed(0)
    groups = []
    for lr in (1e-3, 1e-2, 3e-3):
        group: dict[str, Any] = {
            "params": torch.nn.Linear(3, 3).parameters(),
            "lr": torch.tensor(lr, dtype=dtype),
        }
        if tensor_betas:
            group["betas"] = (torch.tensor(0.9, dtype=dtype), torch.tensor(0.999, dtype=dtype))
        groups.append(group)
    return torch.optim.AdamW(groups, foreach=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensor_lrs_are_updated_in_place_and_equal_torch(
    live_server: Any, dtype: torch.dtype
) -> None:
    # The oracle runs in float64: torch's recursive form, fed back float32-rounded rates,
    # would drift by ~1e-6 relative; lrserve rounds the exact value once.
    opt, ref_opt = _adamw(dtype), _adamw(torch.float64)
    ref = torch_scheduler(ref_opt, WARMUP_COSINE)
    tensors = [g["lr"] for g in opt.param_groups]
    with RemoteScheduler(
        opt, f"tensor-{dtype}", url=live_server.url, spec={"schedule": WARMUP_COSINE}
    ) as sched:
        for step in range(1000):
            for g, rg, t in zip(opt.param_groups, ref_opt.param_groups, tensors, strict=True):
                assert g["lr"] is t and t.dtype == dtype and t.device.type == "cpu"
                # torch's recursive form drifts by ~1e-15 relative; float32 rounds once.
                rtol = 1e-12 if dtype == torch.float64 else 1.2e-7
                expected = rg["lr"].to(dtype)
                assert torch.allclose(g["lr"], expected, rtol=rtol, atol=0), f"step {step}"
            ref_opt.step()
            ref.step()
            sched.step()
        last = sched.get_last_lr()
        assert all(
            isinstance(x, torch.Tensor) and x is not t for x, t in zip(last, tensors, strict=True)
        )


def test_tensor_beta1_cycled_in_place(live_server: Any) -> None:
    node = {"type": "OneCycleLR", "max_lr": 0.01, "total_steps": 100}
    opt = _adamw(torch.float64, tensor_betas=True)
    spec = {"groups": groups_from_optimizer(opt), "schedule": node}
    ref_opt = torch.optim.AdamW(
        [{"params": torch.nn.Linear(3, 3).parameters(), "lr": lr} for lr in (1e-3, 1e-2, 3e-3)],
        foreach=False,
    )
    ref = torch_scheduler(ref_opt, node)
    betas = [g["betas"] for g in opt.param_groups]
    beta1 = [b[0] for b in betas]
    with RemoteScheduler(opt, "tensor-betas", url=live_server.url, spec=spec) as sched:
        for step in range(99):
            assert [g["betas"][0] for g in opt.param_groups] == beta1  # same objects
            assert_same(hyper(opt), hyper(ref_opt), f"step {step}")
            ref_opt.step()
            ref.step()
            sched.step()
        assert all(g["betas"] is b for g, b in zip(opt.param_groups, betas, strict=True))


@pytest.mark.slow
def test_compiled_optimizer_step_does_not_recompile(live_server: Any) -> None:
    """torch.compile on the CPU: tensor lrs -> one graph; the float control recompiles."""
    import torch._dynamo

    def graphs(tensor_lr: bool) -> int:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        body, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        lr = torch.tensor if tensor_lr else float
        opt = torch.optim.AdamW(
            [
                {"params": body.parameters(), "lr": lr(1e-3)},
                {"params": head.parameters(), "lr": lr(1e-2)},
            ],
            foreach=False,
        )
        node = {"type": "ExponentialLR", "gamma": 0.5}
        sched = RemoteScheduler(
            opt, f"compiled-{tensor_lr}", url=live_server.url, spec={"schedule": node}
        )

        @torch.compile
        def opt_step() -> None:
            opt.step()

        x = torch.randn(8, 4)
        seen = []
        for _ in range(4):
            head(body(x)).sum().backward()
            opt_step()
            opt.zero_grad()
            sched.step()
            seen.append(float(opt.param_groups[0]["lr"]))
        sched.close()
        # The values did change every step (float32 tensors round them).
        assert seen == pytest.approx([1e-3 * 0.5**k for k in range(1, 5)], rel=1e-6)
        return int(counters["stats"]["unique_graphs"])

    assert graphs(tensor_lr=True) == 1
    assert graphs(tensor_lr=False) > 1


@pytest.mark.parametrize("fill_on_cpu", [True, False], ids=["fill", "foreach-copy"])
def test_both_tensor_write_paths_write_the_window_values(fill_on_cpu: bool) -> None:
    """The accelerator path (one _foreach_copy_ per device/dtype/shape) exercised on the CPU."""
    from lrserve._window import Window, bind

    lrs = [
        torch.tensor(0.0),
        torch.tensor([0.0], dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
    ]
    beta1 = torch.tensor(0.0)
    groups: list[dict[str, Any]] = [
        {"params": [], "lr": lrs[0], "betas": (beta1, 0.999)},
        {"params": [], "lr": lrs[1], "momentum": 0.0},
        {"params": [], "lr": lrs[2], "weight_decay": 0.0},
    ]
    cols = {
        "a": {"lr": [0.1, 0.2, 0.3], "beta1": [0.9, 0.8, 0.7]},
        "b": {"lr": [1e-3, 2e-3, 3e-3], "momentum": [0.5, 0.6, 0.7]},
        "c": {"lr": [5.0, 6.0, 7.0], "weight_decay": [0.01, 0.02, 0.03]},
    }
    bound = bind(Window(10, 3, 1, None, cols), ["a", "b", "c"], groups, fill_on_cpu=fill_on_cpu)
    assert bool(bound.buckets) != fill_on_cpu
    for i in range(3):
        bound.apply(i)
        assert [g["lr"] for g in groups] == lrs and groups[0]["betas"][0] is beta1  # same objects
        assert lrs[0].item() == torch.tensor(cols["a"]["lr"][i], dtype=torch.float32).item()
        assert lrs[1].shape == (1,) and lrs[1].item() == cols["b"]["lr"][i]
        assert lrs[2].item() == cols["c"]["lr"][i]
        assert beta1.item() == torch.tensor(cols["a"]["beta1"][i], dtype=torch.float32).item()
        assert groups[0]["betas"][1] == 0.999
        assert groups[1]["momentum"] == cols["b"]["momentum"][i]
        assert groups[2]["weight_decay"] == cols["c"]["weight_decay"][i]
