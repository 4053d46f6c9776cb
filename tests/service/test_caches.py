"""Caches bounded by bytes with LRU eviction (issue 12).

The values cache and the compiled-schedule cache keep the most recently used entries within
a byte budget (``LRSERVE_CACHE_BYTES``, ``LRSERVE_COMPILE_CACHE_BYTES``): more runs than an
entry count held stay compiled, eviction goes one least recently used entry at a time, and an
entry may take up to half the budget (a 1,024-group block is not rebuilt every time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from service.api.app import create_app
from service.config import Settings
from service.runs.model import COMPILED, RunSpec, compile_run, compile_spec
from service.runs.values import BytesLRU, ValuesCache

MiB = 1024 * 1024


def _values(nbytes: int) -> dict[str, dict[str, np.ndarray]]:
    return {"g": {"lr": np.zeros(nbytes // 8)}}


def test_least_recently_used_goes_first_by_bytes() -> None:
    cache = ValuesCache(max_bytes=10 * MiB)
    for k in range(4):
        cache.put(k, _values(2 * MiB))
    assert cache.get(0) is not None  # 0 is now the most recently used
    cache.put(4, _values(4 * MiB))  # over budget: 1 goes (least recently used), then 2
    assert cache.get(1) is None and cache.get(2) is None
    assert all(cache.get(k) is not None for k in (0, 3, 4))
    assert cache.evictions == 2 and cache.size_bytes <= cache.max_bytes
    assert cache.hits == 4 and cache.misses == 2


def test_a_large_block_stays_cached_under_the_default_budget() -> None:
    # 1,024 groups x 1,024 steps x (lr, momentum, weight decay): 24 MiB, over a quarter of
    # the default 64 MiB (the old per-entry limit) and under half of it.
    cache = ValuesCache()
    block = {
        f"g{i}": {f: np.zeros(1024) for f in ("lr", "momentum", "weight_decay")}
        for i in range(1024)
    }
    cache.put("big", block)
    assert cache.get("big") is block
    assert not block["g0"]["lr"].flags.writeable  # kept read-only
    cache.put("huge", _values(40 * MiB))  # over half the budget: not kept
    assert cache.get("huge") is None and cache.get("big") is block


def test_resize_evicts_down_to_the_new_budget() -> None:
    cache: BytesLRU[str] = BytesLRU(max_bytes=1000)
    for k in range(5):
        cache.put(str(k), "x", 100)
    cache.resize(400)
    assert len(cache) == 1 and cache.get("4") == "x"
    with pytest.raises(ValueError):
        cache.resize(-1)


def _spec_text(i: int) -> str:
    return RunSpec.model_validate(
        {
            "groups": [{"name": "g", "lr": 0.1}],
            "schedule": {"type": "CosineAnnealingLR", "T_max": 1000 + i},
        }
    ).normalised()


def test_a_thousand_runs_stay_compiled() -> None:
    # The old cache held 512 compiled specs: cycling over more recompiled every one.
    texts = [_spec_text(i) for i in range(1000)]
    first = [compile_spec(t) for t in texts]
    runs = [compile_run(t) for t in texts]
    assert all(compile_spec(t) is c for t, c in zip(texts, first, strict=True))
    assert all(compile_run(t) is r for t, r in zip(texts, runs, strict=True))
    assert COMPILED.size_bytes <= COMPILED.max_bytes


def test_settings_set_both_budgets(tmp_path: Path) -> None:
    env = {"LRSERVE_CACHE_BYTES": str(8 * MiB), "LRSERVE_COMPILE_CACHE_BYTES": str(4 * MiB)}
    settings = Settings.from_env(env)
    assert (settings.cache_bytes, settings.compile_cache_bytes) == (8 * MiB, 4 * MiB)
    assert Settings.from_env(settings.to_env()) == settings
    settings = Settings(
        database=f"sqlite:///{tmp_path / 'c.db'}", cache_bytes=8 * MiB, compile_cache_bytes=4 * MiB
    )
    try:
        app = create_app(settings)
        assert COMPILED.max_bytes == 4 * MiB
        holder = app.state.store_holder
        anyio.run(anyio.to_thread.run_sync, holder.open)
        try:
            assert holder.runs.cache.max_bytes == 8 * MiB
            assert holder.runs.cache.max_entry_bytes == 4 * MiB
        finally:
            holder.close()
    finally:
        COMPILED.resize(Settings().compile_cache_bytes)


def _cache_samples(text: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("lrserve_cache_") and "cache" in sample.labels:
                out[(sample.name, sample.labels["cache"])] = sample.value
    return out


def test_cache_figures_are_exported_for_sizing_the_budgets(server_factory: Any) -> None:
    """``/metrics`` shows each cache's hits, misses, evictions, bytes, budget and entries,
    as the caches themselves count them: what an operator sizes LRSERVE_CACHE_BYTES by."""
    server = server_factory(env={"LRSERVE_CACHE_BYTES": str(1 * MiB)})
    groups = [{"name": f"g{i}", "lr": 0.1} for i in range(32)]  # a 1,024-step block: 256 KiB
    spec = {"groups": groups, "schedule": {"type": "StepLR", "step_size": 10, "gamma": 0.5}}
    with server.client() as c:
        for k in range(6):
            assert c.put(f"/v1/runs/c{k}", json=spec).status_code == 201
        before = _cache_samples(c.get("/metrics").text)
        for k in range(6):  # six blocks of 256 KiB through a 1 MiB budget: evictions
            assert c.get(f"/v1/runs/c{k}/lr", params={"step": 5}).status_code == 200
        for _ in range(3):  # the last run's block is still there: hits
            assert c.get("/v1/runs/c5/lr", params={"step": 6}).status_code == 200
        after = _cache_samples(c.get("/metrics").text)
    assert after[("lrserve_cache_max_bytes", "values")] == 1 * MiB
    assert 0 < after[("lrserve_cache_bytes", "values")] <= 1 * MiB
    gained = {
        name: after[(name, "values")] - before.get((name, "values"), 0.0)
        for name in ("lrserve_cache_hits_total", "lrserve_cache_misses_total")
    }
    assert gained["lrserve_cache_misses_total"] >= 6
    assert gained["lrserve_cache_hits_total"] >= 3
    assert after[("lrserve_cache_evictions_total", "values")] >= 2
    assert 1 <= after[("lrserve_cache_entries", "values")] <= 4
    # Six runs of one spec text share its compiled program (spec and run entries).
    assert after[("lrserve_cache_entries", "compiled")] >= 2
    assert after[("lrserve_cache_hits_total", "compiled")] > before.get(
        ("lrserve_cache_hits_total", "compiled"), 0.0
    )
    assert ("lrserve_cache_max_bytes", "compiled") in after
    # The parsed-state cache (service/runs/states.py) is on the page with its budget.
    assert after[("lrserve_cache_max_bytes", "states")] == 16 * 1024 * 1024
    # So is the reduction lists' (plateau reductions stored as rows, read once per process).
    assert after[("lrserve_cache_max_bytes", "reductions")] == 112 * 1024 * 1024
