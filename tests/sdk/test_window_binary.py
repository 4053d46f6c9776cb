"""The SDK's windows in the binary encoding, against a real server and torch's schedulers.

RemoteScheduler asks for ``application/vnd.lrserve.window`` by default; the values it writes
into the param groups, across many refreshes and the prefetched next window, must be
torch's own, at many groups and with momentum.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from typing import Any

import httpx
import lrserve
import numpy as np
import pytest
import torch
from lrserve import _calls
from lrserve._codec import MEDIA_TYPE, decode_window
from lrserve.torch import RemoteScheduler

from .torch_support import WARMUP_COSINE, torch_scheduler


def _sgd(n: int, momentum: bool) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-2 * 0.95**i} for i in range(n)
    ]
    return torch.optim.SGD(groups, momentum=0.9 if momentum else 0.0)


def _spec(n: int, schedule: dict[str, Any], momentum: bool) -> dict[str, Any]:
    groups: list[dict[str, Any]] = []
    for i in range(n):
        g: dict[str, Any] = {"name": f"g{i}", "lr": 1e-2 * 0.95**i}
        if momentum:
            g["momentum"] = 0.9
        groups.append(g)
    return {"groups": groups, "schedule": schedule}


ONE_CYCLE = {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 400}


@pytest.mark.parametrize(
    ("n", "schedule", "momentum"),
    [(64, WARMUP_COSINE, False), (4, ONE_CYCLE, True)],
    ids=["warmup-cosine-64-groups", "one-cycle-momentum"],
)
def test_applied_values_are_torchs(
    live_server: Any, n: int, schedule: dict[str, Any], momentum: bool
) -> None:
    steps = 399
    ref = _sgd(n, momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        oracle = torch_scheduler(ref, schedule)
    opt = _sgd(n, momentum)
    # A small window: a few dozen refreshes and prefetched windows within the run.
    with RemoteScheduler(
        opt, "bin-oracle", url=live_server.url, spec=_spec(n, schedule, momentum), window=16
    ) as sched:
        for step in range(steps):
            for mine, theirs in zip(opt.param_groups, ref.param_groups, strict=True):
                assert type(mine["lr"]) is float
                # torch's chainable form drifts by an ulp or so from the closed form.
                assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12), step
                if momentum:
                    assert mine["momentum"] == pytest.approx(theirs["momentum"], rel=1e-12)
            sched.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                oracle.step()


def test_the_client_asks_for_binary_and_json_gives_the_same(live_server: Any) -> None:
    spec = _spec(32, WARMUP_COSINE, True)
    with lrserve.Client(live_server.url) as client:
        client.create_run("bin-client", spec)
        call = _calls.get_lr_window("bin-client", 10, 300)
        assert call.headers is not None and MEDIA_TYPE in call.headers["Accept"]
        binary = client.get_lr_window("bin-client", 10, 300)
        as_json = client._send(_calls.get_lr_window("bin-client", 10, 300, binary=False))
        assert binary.values == as_json.values and binary.etag == as_json.etag
        meta, arrays = client._get_lr_window_arrays("bin-client", 10, 300)
        assert arrays is not None and arrays.array.shape == (300, 64)
        assert arrays.columns() == as_json.values
        again, none = client._get_lr_window_arrays("bin-client", 10, 300, etag=meta.etag)
        assert again.not_modified and none is None
    r = httpx.get(
        f"{live_server.url}/v1/runs/bin-client/lr",
        params={"start": 0, "count": 3},
        headers={"Accept": _calls.ACCEPT},
    )
    assert r.headers["content-type"] == MEDIA_TYPE


def test_json_fallback_arrays_match_binary(live_server: Any) -> None:
    with lrserve.Client(live_server.url) as client:
        client.create_run("bin-fallback", _spec(8, ONE_CYCLE, True))
        _, b = client._get_lr_window_arrays("bin-fallback", 0, 100)
        _, j = client._send(_calls.get_lr_window_arrays("bin-fallback", 0, 100, binary=False))
        assert b is not None and j is not None and b.series == j.series
        assert np.array_equal(b.array.view(np.int64), j.array.view(np.int64))


def _lr_gets(url: str) -> float:
    """GET .../lr 200 answers the server counted (its Prometheus counter; the path label is
    the route template, so every run's count: the test's server serves one run)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        counted = line.startswith("lrserve_http_requests_total{") and 'method="GET"' in line
        if counted and '/lr"' in line and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_report_that_changes_no_values_keeps_the_window(live_server: Any) -> None:
    """A report answer names the values version: the scheduler refetches only when it moved."""
    spec = {
        "groups": [{"name": "g0", "lr": 0.1}, {"name": "g1", "lr": 0.01}],
        "schedule": {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0, "factor": 0.5},
    }
    ref = _sgd(2, False)
    for g, lr in zip(ref.param_groups, (0.1, 0.01), strict=True):
        g["lr"] = lr
    oracle = torch.optim.lr_scheduler.ReduceLROnPlateau(ref, patience=0, factor=0.5)
    opt = _sgd(2, False)
    for g, lr in zip(opt.param_groups, (0.1, 0.01), strict=True):
        g["lr"] = lr
    with RemoteScheduler(
        opt, "keep-window", url=live_server.url, spec=spec, poll_interval=3600
    ) as sched:
        before = _lr_gets(live_server.url)
        losses = [1.0, 0.9, 0.8, 0.7, 2.0, 0.5]  # improving, then one rise: one reduction
        fetched = []
        for loss in losses:
            sched.step()  # a reduction decided at step s applies from s + 1: torch's order
            for mine, theirs in zip(opt.param_groups, ref.param_groups, strict=True):
                assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12), loss
            sched.report({"loss": loss})
            oracle.step(loss)
            fetched.append(_lr_gets(live_server.url) - before)
        sched.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [g["lr"] for g in ref.param_groups], rel=1e-12
        )
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
        # No window fetched while the values did not change; one after the reduction.
        assert fetched[:4] == [0, 0, 0, 0], fetched
        assert fetched[4] >= 1, fetched


def _body(live_server: Any, run: str, spec: dict[str, Any], count: int) -> bytes:
    with lrserve.Client(live_server.url) as client:
        client.create_run(run, spec)
    r = httpx.get(
        f"{live_server.url}/v1/runs/{run}/lr",
        params={"start": 3, "count": count, "lease": "false"},
        headers={"Accept": MEDIA_TYPE},
    )
    assert r.headers["content-type"] == MEDIA_TYPE
    return r.content


def _rewrite(body: bytes, edit: Any) -> bytes:
    """``body`` with its header edited by ``edit(header)``, the payload where it was."""
    (n,) = struct.unpack_from("<I", body, 4)
    base = 8 + n + (-(8 + n) % 8)
    header = json.loads(body[8 : 8 + n])
    edit(header)
    head = json.dumps(header).encode()
    prefix = body[:4] + struct.pack("<I", len(head)) + head
    return prefix + b"\0" * (-len(prefix) % 8) + body[base:]


def test_packed_residuals_decode_to_torchs_values(live_server: Any) -> None:
    """A floor (eta_min) and layer-wise rates: columns sent as scale, offset and bit-packed
    ulps; the decoded window is the values torch's own schedulers give, to 1e-12."""
    schedule = {"type": "CosineAnnealingLR", "T_max": 300, "eta_min": 1e-4}
    body = _body(live_server, "bin-packed", _spec(48, schedule, False), 397)
    (n,) = struct.unpack_from("<I", body, 4)
    blocks = json.loads(body[8 : 8 + n])["blocks"]
    assert {b["kind"] for b in blocks} == {"raw", "affine"}, blocks
    assert len(body) < 8 * 397 * 48 / 4
    w = decode_window(body)
    ref = _sgd(48, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = torch_scheduler(ref, schedule)
        for _ in range(3):
            oracle.step()
        for i in range(397):
            got = w.array[i]
            want = [g["lr"] for g in ref.param_groups]
            assert got.tolist() == pytest.approx(want, rel=1e-12), i
            oracle.step()
    # The same window again: bit for bit what the server sends as JSON.
    r = httpx.get(
        f"{live_server.url}/v1/runs/bin-packed/lr",
        params={"start": 3, "count": 397, "lease": "false"},
    )
    groups = r.json()["groups"]
    as_json = np.array([groups[f"g{i}"]["lr"] for i in range(48)], dtype=np.float64).T
    assert np.array_equal(w.array.view(np.int64), as_json.view(np.int64))


def test_corrupt_or_unknown_bodies_are_rejected(live_server: Any) -> None:
    body = _body(live_server, "bin-corrupt", _spec(16, WARMUP_COSINE, True), 101)
    assert decode_window(body).array.shape == (101, 32)

    def kind(h: dict[str, Any]) -> None:
        h["blocks"][-1]["kind"] = "zstd"

    def width(h: dict[str, Any]) -> None:
        next(b for b in h["blocks"] if "width" in b)["width"] = 3

    def missing(h: dict[str, Any]) -> None:
        h["blocks"].pop()

    def forward(h: dict[str, Any]) -> None:
        h["blocks"].reverse()  # derived and identical columns before their originals

    def twice(h: dict[str, Any]) -> None:
        h["blocks"].append(h["blocks"][0])

    def no_blocks(h: dict[str, Any]) -> None:
        del h["blocks"]

    def negative(h: dict[str, Any]) -> None:
        h["blocks"][0]["series"][-1] = -1  # the last column, by Python's reckoning

    def negative_of(h: dict[str, Any]) -> None:
        next(b for b in h["blocks"] if b["kind"] == "same")["of"][0] = -1

    unsupported = "unsupported lrserve binary window format"
    bad = {  # what -> (body, part of the message)
        "older format": (b"LRW1" + body[4:], unsupported),
        "newer format": (b"LRW3" + body[4:], unsupported),
        "not a window": (b"PK\x03\x04" + body[4:], "bad magic"),
        "empty": (b"", "bad magic"),
        "truncated payload": (body[:-9], "smaller than requested"),
        "truncated header": (body[:20], "Unterminated string"),
        "unknown kind": (_rewrite(body, kind), "unknown series kind 'zstd'"),
        "unknown width": (_rewrite(body, width), "unknown residual width 3"),
        "column missing": (_rewrite(body, missing), "columns missing"),
        "forward reference": (_rewrite(body, forward), "not decoded yet"),
        "column twice": (_rewrite(body, twice), "already filled"),
        "no blocks": (_rewrite(body, no_blocks), "malformed lrserve binary window"),
        "negative index": (_rewrite(body, negative), "already filled"),
        "negative original": (_rewrite(body, negative_of), "not decoded yet"),
    }
    for what, (data, message) in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            decode_window(data)
            pytest.fail(what)
