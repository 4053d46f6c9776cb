"""The binary window encoding (``Accept: application/vnd.lrserve.window``) against JSON.

Every window is fetched both ways from a real server and compared bit for bit; the
encoder's own paths (shape and scale, raw fallback, identical columns) are checked on
arrays built to hit each one.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import pytest
from lrserve._codec import MEDIA_TYPE, decode_window

from service.api.window_codec import encode_window, wants_binary
from tests.conftest import ServerProcess
from tests.service.helpers import COSINE_SPEC, new_id

BINARY = {"Accept": MEDIA_TYPE}


def _layerwise(n: int, schedule: dict[str, Any], momentum: bool = False) -> dict[str, Any]:
    groups: list[dict[str, Any]] = []
    for i in range(n):
        g: dict[str, Any] = {"name": f"layer{i}", "lr": 1e-3 * 0.93**i}
        if momentum:
            g["momentum"] = 0.9
        groups.append(g)
    return {"groups": groups, "schedule": schedule}


COSINE = {"type": "CosineAnnealingLR", "T_max": 900}
COSINE_FLOOR = {"type": "CosineAnnealingLR", "T_max": 900, "eta_min": 1e-5}
ONE_CYCLE = {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 5000}

CASES = {
    "cosine-256-groups": _layerwise(256, COSINE),
    "cosine-floor-16-groups": _layerwise(16, COSINE_FLOOR),
    "one-cycle-momentum-8-groups": _layerwise(8, ONE_CYCLE, momentum=True),
    "warmup-cosine": COSINE_SPEC,
}


def _both(client: httpx.Client, rid: str, start: int, count: int) -> tuple[Any, Any, Any]:
    q = {"start": start, "count": count, "lease": "false"}
    j = client.get(f"/v1/runs/{rid}/lr", params=q)
    b = client.get(f"/v1/runs/{rid}/lr", params=q, headers=BINARY)
    assert j.status_code == b.status_code == 200, (j.text, b.text[:200])
    assert j.headers["content-type"].startswith("application/json")
    assert b.headers["content-type"].startswith(MEDIA_TYPE)
    # The ETag names the values, not their encoding; caches must keep the two apart.
    assert j.headers["etag"] == b.headers["etag"]
    assert "accept" in b.headers["vary"].lower() and "accept" in j.headers["vary"].lower()
    return j.json(), decode_window(b.content), b


def _bits(values: list[Any]) -> np.ndarray:
    as_float = [float(v) for v in values]  # "NaN"/"Infinity" strings for non-finite values
    return np.asarray(as_float, dtype=np.float64).view(np.int64)


@pytest.mark.parametrize("case", list(CASES))
def test_binary_windows_equal_json_bitwise(server: ServerProcess, case: str) -> None:
    rid = new_id("enc")
    with server.client() as client:
        assert client.put(f"/v1/runs/{rid}", json=CASES[case]).status_code == 201
        for start, count in ((0, 1), (0, 1000), (37, 4096), (4990, 20)):
            body, w, raw = _both(client, rid, start, count)
            assert (w.start, w.count, w.version) == (body["start"], body["count"], body["version"])
            assert w.run == rid
            groups = body["groups"]
            assert w.series == [(g, f) for g, fs in groups.items() for f in fs]
            for j, (g, f) in enumerate(w.series):
                assert np.array_equal(w.array[:, j].view(np.int64), _bits(groups[g][f])), (g, f)
            if case == "cosine-256-groups" and count >= 1000:
                # One shape and 255 scales: far smaller than the columns themselves.
                assert len(raw.content) < 8 * count * 256 / 4


def test_304_with_the_etag_either_way(server: ServerProcess) -> None:
    rid = new_id("enc")
    with server.client() as client:
        assert client.put(f"/v1/runs/{rid}", json=CASES["cosine-256-groups"]).status_code == 201
        q = {"start": 0, "count": 64}
        first = client.get(f"/v1/runs/{rid}/lr", params=q, headers=BINARY)
        tag = first.headers["etag"]
        for accept in (MEDIA_TYPE, "application/json"):
            again = client.get(
                f"/v1/runs/{rid}/lr", params=q, headers={"Accept": accept, "If-None-Match": tag}
            )
            assert again.status_code == 304 and again.content == b""
            assert again.headers["etag"] == tag and "accept" in again.headers["vary"].lower()


@pytest.mark.parametrize(
    "accept",
    [
        "text/html",
        "*/*",
        "application/json",
        f"{MEDIA_TYPE};q=0",
        f"{MEDIA_TYPE};q=banana",
        f"{MEDIA_TYPE};q=0.2, application/json",
        f"{MEDIA_TYPE};;;q=",
        ",,,;",
        f"{MEDIA_TYPE}+json, {MEDIA_TYPE}x",
    ],
)
def test_other_or_bad_accept_headers_get_json(server: ServerProcess, accept: str) -> None:
    rid = new_id("enc")
    with server.client() as client:
        assert client.put(f"/v1/runs/{rid}", json=COSINE_SPEC).status_code == 201
        r = client.get(
            f"/v1/runs/{rid}/lr", params={"start": 0, "count": 5}, headers={"Accept": accept}
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        assert len(r.json()["groups"]["head"]["lr"]) == 5


def test_binary_errors_are_problem_json(server: ServerProcess) -> None:
    with server.client() as client:
        r = client.get(f"/v1/runs/{new_id()}/lr", params={"start": 0, "count": 5}, headers=BINARY)
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("application/problem+json")
        rid = new_id("enc")
        assert client.put(f"/v1/runs/{rid}", json=COSINE_SPEC).status_code == 201
        r = client.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 0}, headers=BINARY)
        assert r.status_code == 422


def test_windows_at_many_groups_in_both_encodings(server: ServerProcess) -> None:
    rid = new_id("enc")
    with server.client() as client:
        spec = _layerwise(1024, COSINE, momentum=True)
        assert client.put(f"/v1/runs/{rid}", json=spec).status_code == 201
        body, w, raw = _both(client, rid, 100, 512)
        assert w.array.shape == (512, 2048)
        for j in (0, 1, 2, 1023, 2047):
            g, f = w.series[j]
            assert np.array_equal(w.array[:, j].view(np.int64), _bits(body["groups"][g][f]))
        # Momentum is one column for all 1,024 groups, lr one shape and 1,023 scales.
        as_json = client.get(f"/v1/runs/{rid}/lr", params={"start": 100, "count": 512})
        assert len(raw.content) < len(as_json.content) / 20


# -- the encoder's paths, on arrays built to hit each -----------------------------------------


def _header(body: bytes) -> dict[str, Any]:
    import json
    import struct

    (n,) = struct.unpack_from("<I", body, 4)
    header: dict[str, Any] = json.loads(body[8 : 8 + n])
    return header


def _kinds(body: bytes) -> list[str]:
    """Each column's kind (``scaled``/``affine`` with its residual width: ``scaled2``)."""
    header = _header(body)
    kinds = [""] * len(header["series"])
    for block in header["blocks"]:
        for j in block["series"]:
            assert not kinds[j], j
            kinds[j] = block["kind"] + str(block.get("width", ""))
    return kinds


def _roundtrip(values: dict[str, dict[str, np.ndarray]]) -> list[str]:
    count = len(next(iter(next(iter(values.values())).values())))
    body = encode_window("r", 5, count, 3, values)
    w = decode_window(body)
    assert (w.start, w.count, w.version) == (5, count, 3)
    assert w.series == [(g, f) for g, fs in values.items() for f in fs]
    for j, (g, f) in enumerate(w.series):
        assert np.array_equal(w.array[:, j].view(np.int64), values[g][f].view(np.int64)), (g, f)
    return _kinds(body)


def test_encoder_shape_scale_same_and_raw_paths() -> None:
    t = np.arange(2000, dtype=np.float64)
    shape = 0.5 * (1 + np.cos(np.pi * t / 2000))
    values = {
        "a": {"lr": 1e-3 * shape, "momentum": np.full(2000, 0.9)},
        "b": {"lr": 3.7e-4 * shape, "momentum": np.full(2000, 0.9)},
        "c": {"lr": 1e-5 + 2e-3 * shape},  # not proportional: a scale and an offset
        "d": {"lr": np.random.default_rng(0).random(2000)},  # nothing to share: raw
        "e": {"lr": 1e-3 * shape},  # identical to a's
    }
    kinds = _roundtrip(values)
    # A constant column is the shape times 0 plus itself: affine, no residual. The others'
    # rounding differs from the prediction by a few ulps (the widths: 0 to 8 bits).
    plain = [k.rstrip("0123456789") for k in kinds]
    assert plain == ["raw", "affine", "scaled", "same", "affine", "raw", "same"], kinds
    assert kinds[1] == "affine0" and int(kinds[2][6:]) <= 2 and int(kinds[4][6:]) <= 8, kinds


def _shifted(col: np.ndarray, ulps: np.ndarray) -> np.ndarray:
    out: np.ndarray = (col.view(np.int64) + ulps).view(np.float64)
    return out


@pytest.mark.parametrize("count", [3, 333, 4096])  # 333: rows that end mid-byte
def test_residual_widths_and_raw_when_they_do_not_fit(count: int) -> None:
    rng = np.random.default_rng(count)
    shape = 1.0 + np.linspace(0.0, 1.0, count)
    scaled = 0.25 * shape
    values = {"shape": {"lr": shape}}
    # Residuals spanning exactly each width's range, from a negative base.
    for name, span in (("w0", 0), ("w2", 3), ("w4", 15), ("w8", 255), ("w16", 65535)):
        ulps = rng.integers(0, span + 1, count) - span // 2
        # Both ends of the range; none at the peak, where the scale is taken.
        ulps[0], ulps[1], ulps[-1] = -(span // 2), span - span // 2, 0
        values[name] = {"lr": _shifted(scaled, ulps)}
    # A bump wider than 16 bits hold, neither scale nor line: no longer the shape's, raw.
    too_wide = np.zeros(count, dtype=np.int64)
    too_wide[count // 2] = 70_000
    values["wide"] = {"lr": _shifted(scaled, too_wide)}
    kinds = _roundtrip(values)
    assert kinds == ["raw", "scaled0", "scaled2", "scaled4", "scaled8", "scaled16", "raw"], kinds


def test_torchs_own_layerwise_rates_pack_small() -> None:
    """torch's own chainable CosineAnnealingLR (with and without a floor), 64 groups: every
    column but the first derived from it (scale, or scale and offset), decoded bit for bit."""
    import warnings

    import torch

    for eta_min, kind in ((0.0, "scaled"), (1e-5, "affine")):
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(64)]
        groups = [{"params": [p], "lr": 1e-2 * 0.93**i} for i, p in enumerate(params)]
        opt = torch.optim.SGD(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=700, eta_min=eta_min)
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(1001):  # past T_max: the schedule climbs again
                rows.append([g["lr"] for g in opt.param_groups])
                sched.step()
        table = np.array(rows, dtype=np.float64)
        values = {f"g{i}": {"lr": np.ascontiguousarray(table[:, i])} for i in range(64)}
        kinds = _roundtrip(values)
        assert kinds[0] == "raw"
        # The recursion's rounding differs per group (by up to ~100 ulps near lr 0).
        assert all(k.startswith(kind) and k != f"{kind}0" for k in kinds[1:]), kinds
        body = encode_window("r", 0, 1001, 1, values)
        assert len(body) < 8 * 1001 * 64 / 3


def test_encoder_lossless_for_awkward_values() -> None:
    t = np.linspace(-1, 1, 333)
    nan_inf = np.array([math.nan, math.inf, -math.inf, 0.0, -0.0] * 10)
    values = {
        "neg": {"lr": -1e-3 * t},
        "zero": {"lr": np.zeros(333)},
        "tiny": {"lr": 5e-324 * np.ones(333)},
        "signs": {"lr": 2e-3 * t},
        "scaled_neg": {"lr": -7.1 * 2e-3 * t},
    }
    _roundtrip(values)
    _roundtrip({"x": {"lr": nan_inf}, "y": {"lr": 2 * nan_inf}})


def test_wants_binary() -> None:
    assert wants_binary(MEDIA_TYPE)
    assert wants_binary(f"{MEDIA_TYPE}, application/json;q=0.5")
    assert wants_binary(f"application/json;q=0.5, {MEDIA_TYPE}")
    assert not wants_binary(None)
    assert not wants_binary("application/json")
    assert not wants_binary(f"{MEDIA_TYPE};q=0")
    assert not wants_binary(f"{MEDIA_TYPE};q=0.1, application/json")
    assert not wants_binary(f"{MEDIA_TYPE};q=2")


def test_the_evaluations_own_array_is_encoded_without_a_copy() -> None:
    """A window whose series are the rows, in order, of the one array the evaluation made
    (one schedule over every group) is read in place; the bytes are those of the same values
    in separate arrays, and series in another order (or from other arrays) are copied."""
    from service.api.window_codec import _matrix
    from service.schedules import Program, ScheduleSpec

    program = Program(ScheduleSpec.model_validate(_layerwise(32, COSINE_FLOOR)))
    values = program.evaluate(None, 100, 512)
    rows = [fields["lr"] for fields in values.values()]
    shared = _matrix(rows, 512)
    assert shared is rows[0].base and all(np.array_equal(shared[j], r) for j, r in enumerate(rows))
    copies = {g: {f: np.array(v) for f, v in fields.items()} for g, fields in values.items()}
    assert _matrix([fields["lr"] for fields in copies.values()], 512) is not shared
    body = encode_window("r", 100, 512, 1, values)
    assert body == encode_window("r", 100, 512, 1, copies)
    reordered = dict(reversed(list(values.items())))
    back = decode_window(encode_window("r", 100, 512, 1, reordered))
    for j, (group, field) in enumerate(back.series):
        assert np.array_equal(back.array[:, j], reordered[group][field])
