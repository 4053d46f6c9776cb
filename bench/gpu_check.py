"""GPU check of lrserve.torch.RemoteScheduler: fused/capturable AdamW, torch.compile, CUDA graphs.

    .venv/bin/python bench/gpu_check.py [--device cuda] [--steps 2000]
    .venv/bin/python bench/gpu_check.py --device cpu --steps 300   # dry run, no GPU needed

Starts ``python -m service`` on a temporary SQLite file (as bench/bench_sdk.py does), then:

1. **rates**: trains a small MLP (fixed seed, random data) with ``AdamW(fused=True)`` and,
   separately, ``AdamW(capturable=True)``, tensor learning rates on the device, two param
   groups with different base rates, driven by ``RemoteScheduler``: warmup + cosine
   (``SequentialLR``) on ``body``, ``ReduceLROnPlateau`` on ``head`` (fed a validation loss
   that stops improving, so it reduces), and an override (``POST /v1/runs/{id}/overrides``)
   posted half-way. The rate applied at every step (read from the tensor) is compared with
   the server's record (``GET /v1/runs/{id}/lr?start=0&count=N``) and with torch's own
   ``SequentialLR(LinearLR, CosineAnnealingLR)`` / ``ReduceLROnPlateau`` on twin optimizers
   fed the same reports (the override applied the way the server documents it).
2. **compile**: the optimizer step under ``torch.compile`` while the scheduler changes the
   rates every step: one graph, no recompile, graph breaks counted (dynamo counters).
3. **cuda-graph** (CUDA only): the whole training step captured once in a CUDA graph
   (``capturable=True``) and replayed while the rates change (schedule and an override):
   the parameters must equal an eager twin's that was given the same rates.
4. **overhead**: per-step time of the training loop with ``RemoteScheduler`` against the
   same loop with torch's own scheduler (median of interleaved repetitions; CUDA events on
   CUDA, ``perf_counter`` on the CPU), and on CUDA the host-device synchronisations the SDK
   causes (``torch.cuda.set_sync_debug_mode("warn")``), by call site.

Prints one line per check (PASS / FAIL / SKIP with figures); exits 1 on any FAIL. Without
CUDA and without ``--device cpu`` it prints one line saying there is nothing to check and
exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

WINDOW = 32
"""Steps per window the checks' schedulers fetch: an override can start about this far ahead."""

NO_CUDA = (
    "CUDA is not available on this machine: nothing to check; "
    "run with --device cpu for a dry run of the device-independent checks"
)

BODY_LR, HEAD_LR = 1e-3, 3e-3
IN, HIDDEN, BATCH, BATCHES = 32, 64, 64, 16


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, SKIP, INFO
    detail: str


# -- the server ------------------------------------------------------------------------


def start_server(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m service`` on a free loopback port and a fresh SQLite file."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(port),
            "--database",
            f"sqlite:///{tmp}/gc.db",
        ],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the lrserve server exited with {proc.returncode} at start")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the lrserve server did not become ready in 60 s")


def post_override(url: str, run: str, from_step: int, value: float, group: str) -> tuple[int, int]:
    """Scale ``group``'s lr by ``value`` from ``from_step`` on, or from the earliest step the
    server can guarantee when that is too late; returns (the new values version, that step)."""
    import httpx

    body = {
        "from_step": from_step,
        "action": "scale",
        "value": value,
        "groups": [group],
        "note": "gpu_check",
    }
    r = httpx.post(f"{url}/v1/runs/{run}/overrides", json=body, timeout=10)
    if r.status_code == 409 and r.json().get("type") == "/problems/too-late":
        body["from_step"] = int(r.json()["earliest_step"])
        r = httpx.post(f"{url}/v1/runs/{run}/overrides", json=body, timeout=10)
    r.raise_for_status()
    # Windows (and so the scheduler) carry the values version, not the run's version.
    run_doc = r.json()
    return int(run_doc.get("values_version", run_doc["version"])), int(body["from_step"])


def server_lrs(url: str, run: str, count: int, names: list[str]) -> list[list[float]]:
    """The server's record: per step, the lr of each group."""
    import httpx

    r = httpx.get(f"{url}/v1/runs/{run}/lr", params={"start": 0, "count": count}, timeout=30)
    r.raise_for_status()
    cols = [r.json()["groups"][n]["lr"] for n in names]
    return [list(row) for row in zip(*cols, strict=True)]


def wait_version(sched: Any, version: int, timeout: float = 15.0) -> float:
    """Seconds until the scheduler's refresher brings ``version`` (the loop does not ask)."""
    t0 = time.perf_counter()
    while (sched.version or 0) < version:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"version {version} did not reach the scheduler in {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - t0


# -- the model and the schedule ------------------------------------------------------------


def schedule(steps: int) -> tuple[dict[str, Any], int]:
    warm = max(steps // 10, 1)
    node = {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.01, "total_iters": warm},
            {"type": "CosineAnnealingLR", "T_max": max(steps - warm, 1), "eta_min": 1e-6},
        ],
        "milestones": [warm],
    }
    return node, warm


def spec(steps: int) -> dict[str, Any]:
    node, _ = schedule(steps)
    plateau = {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
    return {"schedule": node, "group_schedules": {"head": plateau}}


def val_loss(k: int) -> float:
    """The k-th reported validation loss: improves twice, then stops improving."""
    return [1.0, 0.9][k] if k < 2 else 0.95


def make_model(dev: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    body = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN)
    ).to(dev)
    head = torch.nn.Linear(HIDDEN, 1).to(dev)
    return body, head


def make_opt(
    body: torch.nn.Module, head: torch.nn.Module, dev: torch.device, **kw: Any
) -> torch.optim.AdamW:
    groups = [
        {"params": body.parameters(), "lr": torch.tensor(BODY_LR, device=dev), "name": "body"},
        {"params": head.parameters(), "lr": torch.tensor(HEAD_LR, device=dev), "name": "head"},
    ]
    return torch.optim.AdamW(groups, **kw)


def make_data(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES, BATCH, IN, generator=g)
    y = x[..., :4].sum(-1, keepdim=True) + 0.1 * torch.randn(BATCHES, BATCH, 1, generator=g)
    return x.to(dev), y.to(dev)


def train_step(
    body: torch.nn.Module,
    head: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    opt_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    loss = torch.nn.functional.mse_loss(head(torch.relu(body(x))), y)
    loss.backward()
    (opt_step or opt.step)()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def torch_twin(steps: int) -> tuple[Any, Any, list[torch.optim.Optimizer]]:
    """torch's own schedulers for what the run serves: SequentialLR (body), plateau (head)."""
    from torch.optim import lr_scheduler

    _, warm = schedule(steps)
    p = torch.zeros(1, requires_grad=True)
    body_opt = torch.optim.SGD([p], lr=BODY_LR)
    head_opt = torch.optim.SGD([p], lr=HEAD_LR)
    seq = lr_scheduler.SequentialLR(
        body_opt,
        [
            lr_scheduler.LinearLR(body_opt, start_factor=0.01, total_iters=warm),
            lr_scheduler.CosineAnnealingLR(body_opt, T_max=max(steps - warm, 1), eta_min=1e-6),
        ],
        milestones=[warm],
    )
    plateau = lr_scheduler.ReduceLROnPlateau(head_opt, mode="min", factor=0.5, patience=0)
    return seq, plateau, [body_opt, head_opt]


def max_rel(a: list[list[float]], b: list[list[float]]) -> float:
    return max(
        abs(x - y) / max(abs(y), 1e-30)
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra, rb, strict=True)
    )


# -- check 1: applied rates against the server and torch -----------------------------------


def check_rates(url: str, dev: torch.device, steps: int, variant: str) -> Result:
    from lrserve.torch import RemoteScheduler

    name = f"rates ({variant}=True)"
    kw = {variant: True}
    body, head = make_model(dev)
    opt = make_opt(body, head, dev, **kw)
    if variant == "capturable" and dev.type == "cpu":
        try:
            x0, y0 = make_data(dev)
            train_step(body, head, opt, x0[0], y0[0])
        except (AssertionError, RuntimeError) as exc:
            return Result(name, "SKIP", f"torch refuses it on {dev.type}: {exc}")
        body, head = make_model(dev)
        opt = make_opt(body, head, dev, **kw)
    x, y = make_data(dev)
    run = f"gpu-check-rates-{variant}"
    every = max(steps // 8, 2)
    override_at = steps // 2 + 1
    override_from = override_at + max(steps // 20, 5)
    seq, plateau, twin_opts = torch_twin(steps)
    expected: list[list[float]] = []
    rec = torch.empty(steps, 2, dtype=torch.float64, device=dev)
    lr_objects = [g["lr"] for g in opt.param_groups]
    reports = reductions = 0
    latency = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: scheduler.step() before optimizer.step()
        # A short window: the server leases what trainers hold, so an override can start
        # about a window ahead of the loop (see docs/operations.md, "too-late").
        with RemoteScheduler(
            opt, run, url=url, spec=spec(steps), poll_interval=0.1, window=WINDOW
        ) as sched:
            loss = torch.zeros((), device=dev)
            for s in range(steps):
                for i, g in enumerate(opt.param_groups):
                    rec[s, i].copy_(g["lr"])  # device to device: no synchronisation
                scale = 0.5 if s >= override_from else 1.0
                expected.append(
                    [
                        float(twin_opts[0].param_groups[0]["lr"]) * scale,
                        float(twin_opts[1].param_groups[0]["lr"]),
                    ]
                )
                if s == override_at:
                    version, override_from = post_override(url, run, override_from, 0.5, "body")
                    latency = wait_version(sched, version)
                loss = train_step(body, head, opt, x[s % BATCHES], y[s % BATCHES])
                if s > 0 and s % every == 0:
                    v = val_loss(reports)
                    res = sched.report({"val_loss": v})
                    reports += 1
                    reductions += bool(res and (res.get("decision") or {}).get("reduced"))
                    plateau.step(v)
                seq.step()
                sched.step()
            same_objects = all(
                g["lr"] is t for g, t in zip(opt.param_groups, lr_objects, strict=True)
            )
            final_loss = float(loss)
    applied = rec.cpu().tolist()
    served = server_lrs(url, run, steps, ["body", "head"])
    d_server = max_rel(applied, served)
    d_torch = max_rel(applied, expected)
    d_server_torch = max_rel(served, expected)
    # float32 rates are float32(exact value): 2**-24 relative at most.
    tol = 1e-6 if lr_objects[0].dtype == torch.float32 else 1e-12
    ok = (
        d_server <= tol
        and d_torch <= tol
        and reductions >= 1
        and same_objects
        and applied[-1][1] < HEAD_LR
        and final_loss == final_loss
    )
    detail = (
        f"{steps} steps, max rel diff applied/server {d_server:.1e}, applied/torch "
        f"{d_torch:.1e}, server/torch {d_server_torch:.1e} (tol {tol:.0e}); "
        f"{reductions} plateau reduction(s) in {reports} reports; override reached the "
        f"trainer {latency * 1000:.0f} ms after the POST ({override_from - override_at} steps "
        f"ahead); tensors kept: {same_objects}; final loss {final_loss:.3g}"
    )
    return Result(name, "PASS" if ok else "FAIL", detail)


# -- check 2: torch.compile ----------------------------------------------------------------


def cxx_compiler() -> str | None:
    for cc in filter(None, [os.environ.get("CXX"), "g++", "c++", "clang++"]):
        path = shutil.which(cc)
        if path:
            return path
    return None


def check_compile(url: str, dev: torch.device, steps: int) -> list[Result]:
    import torch._dynamo
    from lrserve.torch import RemoteScheduler
    from torch._dynamo.utils import counters

    name = "compile"
    if dev.type == "cpu" and cxx_compiler() is None:
        return [Result(name, "SKIP", "torch.compile (inductor) on the CPU needs a C++ compiler")]
    n = min(steps, 100)
    x, y = make_data(dev)
    out: list[Result] = []

    def compiled_run(kw: dict[str, Any], run: str) -> tuple[dict[str, Any], list[float]]:
        torch._dynamo.reset()
        counters.clear()
        body, head = make_model(dev)
        opt = make_opt(body, head, dev, **kw)
        sched = RemoteScheduler(opt, run, url=url, spec=spec(n), poll_interval=0.1)

        @torch.compile
        def opt_step() -> None:
            opt.step()

        seen: list[float] = []
        after_first: dict[str, int] = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for s in range(n):
                    train_step(body, head, opt, x[s % BATCHES], y[s % BATCHES], opt_step)
                    if s == 0:
                        after_first = {
                            "graphs": int(counters["stats"]["unique_graphs"]),
                            "frames": int(counters["frames"]["total"]),
                        }
                    if s in (n // 3, 2 * n // 3):
                        sched.report({"val_loss": 1.0})  # the second one reduces head's rate
                    sched.step()
                    if s % max(n // 10, 1) == 0:
                        seen.append(float(opt.param_groups[0]["lr"]))
        finally:
            sched.close()
        stats = {
            "graphs": int(counters["stats"]["unique_graphs"]),
            "frames": int(counters["frames"]["total"]),
            "breaks": sum(counters["graph_break"].values()),
            "reasons": sorted({k.split("\n")[0] for k in counters["graph_break"]}),
            "first": after_first,
        }
        return stats, seen

    # The compiled optimizer: tensor rates on the device; capturable where it is allowed.
    kw: dict[str, Any] = {"capturable": True} if dev.type == "cuda" else {"foreach": False}
    try:
        t0 = time.perf_counter()
        st, seen = compiled_run(kw, "gpu-check-compile")
        took = time.perf_counter() - t0
    except Exception as exc:
        if dev.type == "cpu":
            return [Result(name, "SKIP", f"torch.compile does not work here: {exc!r}"[:300])]
        return [Result(name, "FAIL", f"{type(exc).__name__}: {exc}"[:300])]
    # A recompile converts the frame again (and usually adds a graph).
    recompiles = max(st["frames"] - st["first"]["frames"], st["graphs"] - st["first"]["graphs"])
    changed = len(set(seen)) > 1
    ok = st["graphs"] == 1 and recompiles == 0 and changed
    opts = ", ".join(f"{k}={v}" for k, v in kw.items())
    out.append(
        Result(
            f"{name} (AdamW {opts})",
            "PASS" if ok else "FAIL",
            f"{n} steps in {took:.1f} s, rates changed every step ({len(set(seen))} distinct "
            f"of {len(seen)} sampled): graphs compiled {st['graphs']}, recompiles {recompiles}, "
            f"graph breaks {st['breaks']} ({'; '.join(st['reasons']) or 'none'})",
        )
    )
    # fused=True: torch does not trace fused optimizers (torch.compiler.disable): informative.
    try:
        st, _ = compiled_run({"fused": True}, "gpu-check-compile-fused")
        out.append(
            Result(
                f"{name} (AdamW fused=True)",
                "INFO",
                f"graphs {st['graphs']}, graph breaks {st['breaks']}: torch runs the fused "
                "kernel eagerly under torch.compile (torch.compiler.disable), nothing to recompile",
            )
        )
    except Exception as exc:
        out.append(Result(f"{name} (AdamW fused=True)", "INFO", f"{exc!r}"[:300]))
    return out


# -- check 3: CUDA graph -------------------------------------------------------------------


def check_cuda_graph(url: str, dev: torch.device, steps: int) -> Result:
    from lrserve.torch import RemoteScheduler

    name = "cuda-graph"
    if dev.type != "cuda":
        return Result(name, "SKIP", "CUDA only")
    n = min(steps, 400)
    x, y = make_data(dev)
    body, head = make_model(dev)
    opt = make_opt(body, head, dev, capturable=True)
    t_body, t_head = make_model(dev)
    t_opt = make_opt(t_body, t_head, dev, capturable=True)
    run = "gpu-check-graph"
    sched = RemoteScheduler(opt, run, url=url, spec=spec(n), poll_interval=0.1, window=WINDOW)

    def twin_rates() -> None:
        for g, tg in zip(opt.param_groups, t_opt.param_groups, strict=True):
            tg["lr"].copy_(g["lr"])

    def loss_of(
        b: torch.nn.Module, h: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor
    ) -> torch.Tensor:
        return torch.nn.functional.mse_loss(h(torch.relu(b(xb))), yb)

    static_x, static_y = x[0].clone(), y[0].clone()
    rates = torch.empty(n, 2, device=dev)
    try:
        twin_rates()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (optimizer state), identical for both
                for b, h, o in ((body, head, opt), (t_body, t_head, t_opt)):
                    o.zero_grad(set_to_none=True)
                    loss_of(b, h, static_x, static_y).backward()
                    o.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        # thread_local: the scheduler's refresher thread may touch CUDA while this captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss_of(body, head, static_x, static_y).backward()
            opt.step()
        captures = 1
        override_at, override_from = n // 2, n // 2 + 10
        for s in range(n):
            if s == override_at:
                version, override_from = post_override(url, run, override_from, 0.1, "body")
                wait_version(sched, version)
            static_x.copy_(x[s % BATCHES])
            static_y.copy_(y[s % BATCHES])
            for i, g in enumerate(opt.param_groups):
                rates[s, i].copy_(g["lr"])
            graph.replay()
            twin_rates()
            t_opt.zero_grad(set_to_none=True)
            loss_of(t_body, t_head, x[s % BATCHES], y[s % BATCHES]).backward()
            t_opt.step()
            sched.step()
        torch.cuda.synchronize()
    finally:
        sched.close()
    diff = 0.0
    for p, tp in zip(
        [*body.parameters(), *head.parameters()],
        [*t_body.parameters(), *t_head.parameters()],
        strict=True,
    ):
        diff = max(diff, float((p - tp).abs().max() / tp.abs().max().clamp_min(1e-30)))
    distinct = len(set(rates[:, 0].tolist()))
    served = server_lrs(url, run, n, ["body", "head"])
    d_server = max_rel(rates.double().cpu().tolist(), served)
    ok = diff <= 1e-4 and distinct > n // 2 and d_server <= 1e-6 and captures == 1
    return Result(
        name,
        "PASS" if ok else "FAIL",
        f"captured {captures}x, replayed {n}x with {distinct} distinct body rates (override "
        f"at step {override_from}); params vs eager twin max rel diff {diff:.1e} (tol 1e-4); "
        f"rates used vs server {d_server:.1e}",
    )


# -- check 4: overhead and synchronisations ------------------------------------------------


class SyncLog:
    """``torch.cuda.set_sync_debug_mode("warn")`` warnings, by thread and call site."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.site = "loop"

    @contextmanager
    def recording(self) -> Iterator[None]:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = self._show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("default")

    def _show(self, message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" in str(message).lower():
            thread = threading.current_thread()
            where = self.site if thread is threading.main_thread() else f"thread {thread.name}"
            self.seen.append((where, str(message).split("\n")[0]))

    def count(self, where: str) -> int:
        return sum(1 for w, _ in self.seen if w == where)


def check_overhead(url: str, dev: torch.device, steps: int, max_ratio: float) -> list[Result]:
    from lrserve.torch import RemoteScheduler
    from torch.optim import lr_scheduler

    k, reps = min(steps, 200), 5
    total = k * (reps + 1) + 10
    x, y = make_data(dev)
    node, warm = schedule(total)
    loops: dict[str, tuple[Any, Any, Any, Any]] = {}
    for kind in ("torch", "lrserve"):
        body, head = make_model(dev)
        opt = make_opt(body, head, dev, fused=True)
        if kind == "torch":
            sched: Any = lr_scheduler.SequentialLR(
                opt,
                [
                    lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warm),
                    lr_scheduler.CosineAnnealingLR(opt, T_max=total - warm, eta_min=1e-6),
                ],
                milestones=[warm],
            )
        else:
            sched = RemoteScheduler(
                opt, "gpu-check-overhead", url=url, spec={"schedule": node}, window=total
            )
        loops[kind] = (body, head, opt, sched)

    def run(kind: str, count: int, sync_log: SyncLog | None = None) -> float:
        body, head, opt, sched = loops[kind]
        step = sched.step
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for s in range(count):
            if sync_log is not None:
                sync_log.site = "loop"
            train_step(body, head, opt, x[s % BATCHES], y[s % BATCHES])
            if sync_log is not None:
                sync_log.site = f"{kind} step()"
            step()
        if dev.type == "cuda":
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) * 1000 / count
        return (time.perf_counter() - t0) * 1e6 / count

    times: dict[str, list[float]] = {"torch": [], "lrserve": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in times:
            run(kind, k // 2)  # warm-up
        for _ in range(reps):  # interleaved: drift on a noisy machine hits both
            for kind in times:
                times[kind].append(run(kind, k))
    t_us, r_us = statistics.median(times["torch"]), statistics.median(times["lrserve"])
    ratio = r_us / t_us
    clock = "CUDA events" if dev.type == "cuda" else "perf_counter"
    out = [
        Result(
            "overhead",
            "PASS" if ratio <= max_ratio else "FAIL",
            f"training step with RemoteScheduler {r_us:.1f} µs vs torch SequentialLR "
            f"{t_us:.1f} µs: ratio {ratio:.3f} (limit {max_ratio}; median of {reps} x {k} "
            f"steps, {clock}, AdamW fused=True)",
        )
    ]
    remote = loops["lrserve"][3]
    if dev.type != "cuda":
        out.append(Result("syncs", "SKIP", "host-device synchronisations: CUDA only"))
        remote.close()
        return out
    log = SyncLog()
    with log.recording():
        run("torch", k, log)
        run("lrserve", k, log)
        log.site = "report()"
        remote.report({"val_loss": 1.0})
        log.site = "lrserve step()"
        run("lrserve", 10, log)
    remote.close()
    sdk = log.count("lrserve step()")
    threads = sum(1 for w, _ in log.seen if w.startswith("thread"))
    sites = sorted({m for _, m in log.seen})[:3]
    out.append(
        Result(
            "syncs",
            "PASS" if sdk == 0 else "FAIL",
            f"in {2 * k + 10} RemoteScheduler.step(): {sdk}; torch scheduler step(): "
            f"{log.count('torch step()')}; training step: {log.count('loop')}; one report(): "
            f"{log.count('report()')}; refresher thread: {threads}"
            + (f"; e.g. {sites}" if sites else ""),
        )
    )
    return out


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (dry run)")
    ap.add_argument("--steps", type=int, default=2000, help="training steps of the rates check")
    ap.add_argument("--max-ratio", type=float, default=1.25, help="overhead limit (lrserve/torch)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    if dev.type not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.steps < 40:
        ap.error("--steps must be at least 40")
    sys.path[:0] = [str(ROOT / "clients"), str(ROOT)]
    t_start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        name = f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    else:
        name = f"cpu {platform.processor() or platform.machine()}, {os.cpu_count()} cores (dry run)"
    print(f"device: {name}; torch {torch.__version__}; python {sys.version.split()[0]}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(tmp)
        try:
            checks: list[tuple[str, Callable[[], list[Result]]]] = [
                ("rates (fused=True)", lambda: [check_rates(url, dev, args.steps, "fused")]),
                (
                    "rates (capturable=True)",
                    lambda: [check_rates(url, dev, args.steps, "capturable")],
                ),
                ("compile", lambda: check_compile(url, dev, args.steps)),
                ("cuda-graph", lambda: [check_cuda_graph(url, dev, args.steps)]),
                ("overhead", lambda: check_overhead(url, dev, args.steps, args.max_ratio)),
            ]
            for label, check in checks:
                t0 = time.perf_counter()
                try:
                    got = check()
                except Exception as exc:  # a crash is a FAIL of that check, not of the report
                    got = [Result(label, "FAIL", f"{type(exc).__name__}: {exc}"[:400])]
                for r in got:
                    results.append(r)
                    print(f"{r.status:<4}  {r.name}: {r.detail} [{time.perf_counter() - t0:.1f} s]")
                    sys.stdout.flush()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    failed = [r.name for r in results if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"result: {'FAIL' if failed else 'PASS'} ({counts['PASS']} passed, {counts['FAIL']} "
        f"failed, {counts['SKIP']} skipped) in {time.perf_counter() - t_start:.1f} s"
        + (f": {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
