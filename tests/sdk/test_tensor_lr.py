"""Tensor learning rates (and betas) are written in place; compiled steps do not recompile."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from lrserve.torch import RemoteScheduler, groups_from_optimizer
from torch._dynamo.utils import counters
from torch.optim import lr_scheduler

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


def test_groups_sharing_one_lr_tensor_each_get_their_own_rate(live_server: Any) -> None:
    """AdamW(groups, lr=torch.tensor(...)) gives every group one tensor: each needs its own."""

    def model_and_groups(seed: int) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        return model, [
            {"params": model[0].parameters(), "name": "body"},
            {"params": model[1].parameters(), "name": "head"},
        ]

    model, groups = model_and_groups(0)
    opt = torch.optim.AdamW(groups, lr=torch.tensor(1e-2), foreach=False)
    shared = opt.param_groups[0]["lr"]
    assert opt.param_groups[1]["lr"] is shared  # torch's doing: the precondition of the issue
    ref_model, ref_groups = model_and_groups(0)
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-2, foreach=False)
    ref = lr_scheduler.LambdaLR(ref_opt, [lambda k: 0.5**k, lambda k: 0.9**k])
    spec = {
        "schedule": {"type": "ExponentialLR", "gamma": 0.5},
        "group_schedules": {"head": {"type": "ExponentialLR", "gamma": 0.9}},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = RemoteScheduler(opt, "shared-lr", url=live_server.url, spec=spec)
    tensors = [g["lr"] for g in opt.param_groups]
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    with sched:
        for step in range(1, 31):
            for m, o in ((model, opt), (ref_model, ref_opt)):
                m(x).pow(2).mean().backward()
                o.step()
                o.zero_grad()
            sched.step()
            ref.step()
            assert [g["lr"] for g in opt.param_groups] == tensors  # still in place
            expected = [1e-2 * 0.5**step, 1e-2 * 0.9**step]
            actual = [float(t) for t in tensors]
            assert actual == pytest.approx(expected, rel=1e-6), f"step {step}"
        # And the optimizer used each group's own rate: same parameters as the float control.
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    # The first group kept the tensor, the second got its own copy; the user was told once.
    assert tensors[0] is shared and tensors[1] is not shared
    assert tensors[1].dtype == shared.dtype and tensors[1].device == shared.device
    told = [str(w.message) for w in caught if "shared tensor" in str(w.message)]
    assert len(told) == 1 and "'head'" in told[0], [str(w.message) for w in caught]


def test_shared_tensor_betas_and_replaced_param_groups(live_server: Any) -> None:
    """Shared tensor betas are untied too, and so are groups optimizer.load_state_dict brings."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    opt = torch.optim.Adam(
        [{"params": a.parameters(), "lr": 0.1}, {"params": b.parameters(), "lr": 0.01}],
        betas=betas,
        foreach=False,
    )
    assert opt.param_groups[0]["betas"] is opt.param_groups[1]["betas"]
    node = {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 100, "pct_start": 0.5}
    spec = {
        "groups": groups_from_optimizer(opt),
        "schedule": {"type": "ConstantLR", "factor": 1.0, "total_iters": 0},
        "group_schedules": {"group1": node},  # only the second group cycles beta1
    }
    with pytest.warns(UserWarning, match="shared tensor"):
        sched = RemoteScheduler(opt, "shared-betas", url=live_server.url, spec=spec)
    with sched:
        for _ in range(20):
            sched.step()
        beta1 = [float(g["betas"][0]) for g in opt.param_groups]
        # The first group keeps its constant beta1, the second one's cycles (0.95 -> 0.85).
        assert beta1[0] == pytest.approx(0.9, rel=1e-6) and 0.86 < beta1[1] < 0.94
        assert opt.param_groups[0]["betas"][0] is betas[0]
        assert opt.param_groups[1]["betas"][0] is not betas[0]
        # A checkpoint from an optimizer whose groups share one lr tensor.
        state = opt.state_dict()
        lr = torch.tensor(0.01)
        for g in state["param_groups"]:
            g["lr"] = lr
        opt.load_state_dict(state)
        assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
        sched.step()
        assert opt.param_groups[0]["lr"] is not opt.param_groups[1]["lr"]
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1)  # ConstantLR: its base
        assert float(opt.param_groups[1]["lr"]) != pytest.approx(0.1)  # OneCycle's own


def test_bind_refuses_to_share_one_tensor_between_groups() -> None:
    """A window bound to shared tensors is marked so that step() unties them first."""
    from lrserve._window import Window, bind

    lr = torch.tensor(0.0)
    groups: list[dict[str, Any]] = [{"params": [], "lr": lr}, {"params": [], "lr": lr}]
    cols = {"a": {"lr": [0.1]}, "b": {"lr": [0.2]}}
    assert bind(Window(0, 1, 1, None, cols), ["a", "b"], groups).groups is not groups
    groups[1]["lr"] = lr.clone()
    assert bind(Window(0, 1, 1, None, cols), ["a", "b"], groups).groups is groups
