"""Scan checkpoints kept outside the process (issue 12): a fresh program resumes a far scan
from a checkpoint a backing kept, with the same bits as the scan from step 0, and torch's.

The backing here is a dict, an implementation of the engine's ``ScanBacking`` protocol (the
service's, on the real databases, is tested in tests/service/test_scan_checkpoints.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service.schedules import Program, ScheduleSpec, set_scan_backing, torch_compose
from service.schedules.cost import WorkLimitExceeded, check_work
from tests.schedules.conftest import assert_matches
from tests.schedules.test_compose_checkpoints import (
    COS,
    EXP,
    LRS,
    ROP,
    RTOL,
    chain_curve,
    chain_torch,
    feed,
    program,
    window,
)

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")

FAR = 150_000
COUNT = 1_000


class DictBacking:
    """Checkpoints in a dict; records what was asked and saved."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int, bytes], bytes] = {}
        self.loads: list[tuple[str, int, int]] = []
        self.saves: list[tuple[str, int]] = []

    def load(self, curve: str, most: int, least: int) -> list[tuple[int, bytes, bytes]]:
        self.loads.append((curve, most, least))
        found = [
            (b, s, lr) for (c, b, s), lr in self.rows.items() if c == curve and least <= b <= most
        ]
        return sorted(found, key=lambda r: -r[0])[:8]

    def save(self, curve: str, block: int, signature: bytes, lr: bytes) -> None:
        self.saves.append((curve, block))
        self.rows.setdefault((curve, block, signature), lr)


@pytest.fixture
def backing() -> Iterator[DictBacking]:
    b = DictBacking()
    set_scan_backing(b)
    yield b
    set_scan_backing(None)


@pytest.fixture(scope="module")
def plain() -> np.ndarray:
    return chain_torch([EXP, COS], FAR + COUNT, {})


def test_a_fresh_program_resumes_from_the_backing(backing: DictBacking, plain: np.ndarray) -> None:
    first = program([EXP, COS])
    name = chain_curve(first)._name
    assert name is not None and name.startswith(first.scan_name or "?")
    cold = window(first, None, FAR, COUNT)
    assert_matches(cold, plain[:, FAR:], RTOL)
    saved = {b for c, b in backing.saves if c == name}
    block = chain_curve(first)._block
    # Every block edge of the scan but the first few (a scan that near its start costs less
    # than reading one back).
    assert saved == set(range(torch_compose._LOAD_GAP + 1, (FAR + COUNT - 1) // block + 1))
    # Another compile of the same spec (a restarted process): new memo tokens, same names.
    backing.saves.clear()
    again = program([EXP, COS])
    assert chain_curve(again)._name == name
    resumed = window(again, None, FAR, COUNT)
    assert np.array_equal(resumed, cold)
    assert backing.loads and backing.loads[-1][0] == name
    # It scanned only from the checkpoint it read: nothing before it was computed again.
    assert all(b > FAR // block - 1 for _, b in backing.saves)


def test_checkpoints_of_another_state_or_spec_are_not_used(backing: DictBacking) -> None:
    nodes = [EXP, ROP, COS]
    reports = {100: 1.0, 50_000: 1.0}
    p = program(nodes)
    state = feed(p, reports)
    window(p, state, FAR, COUNT)
    # A state with one more reduction before FAR: the stored edges after it are not valid.
    grown, decision = p.observe(state, 120_000, {"loss": 1.0})
    assert decision["reduced"]
    set_scan_backing(None)
    expected = window(program(nodes), grown, FAR, COUNT)
    set_scan_backing(backing)
    fresh = program(nodes)
    assert np.array_equal(window(fresh, grown, FAR, COUNT), expected)
    theirs = chain_torch(nodes, FAR + COUNT, {**reports, 120_000: 1.0})
    assert_matches(expected, theirs[:, FAR:], RTOL)
    # Another spec (other base rates) never reads this one's checkpoints.
    other = Program(
        ScheduleSpec.model_validate(
            {
                "groups": [{"name": f"g{i}", "lr": lr * 2} for i, lr in enumerate(LRS)],
                "schedule": {"type": "ChainedScheduler", "schedulers": [EXP, COS]},
            }
        )
    )
    assert other.scan_name != p.scan_name


def test_a_malformed_stored_checkpoint_is_ignored(backing: DictBacking, plain: np.ndarray) -> None:
    p = program([EXP, COS])
    expected = window(p, None, FAR, COUNT)
    for key in list(backing.rows):
        backing.rows[key] = backing.rows[key][:8]  # one value for two groups
    again = program([EXP, COS])
    assert np.array_equal(window(again, None, FAR, COUNT), expected)


def test_sequential_segments_that_keep_the_lr_resume_too(backing: DictBacking) -> None:
    mult = [
        {"type": "MultiplicativeLR", "lr_lambda": "0.99999"},
        {"type": "MultiplicativeLR", "lr_lambda": "1 - 1e-7 * (epoch % 5)"},
    ]
    spec: dict[str, Any] = {
        "groups": [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(LRS)],
        "schedule": {"type": "SequentialLR", "schedulers": mult, "milestones": [1_000]},
    }
    first = Program(ScheduleSpec.model_validate(spec))
    cold = np.stack([v["lr"] for v in first.evaluate(None, FAR, COUNT).values()])
    names = {c for c, _ in backing.saves}
    assert names and all(n.startswith(f"{first.scan_name}/schedule#") for n in names)
    backing.saves.clear()
    again = Program(ScheduleSpec.model_validate(spec))
    assert np.array_equal(
        np.stack([v["lr"] for v in again.evaluate(None, FAR, COUNT).values()]), cold
    )
    assert backing.loads
    assert all(b >= FAR // torch_compose._BLOCK - 1 for _, b in backing.saves)


def test_windows_near_the_start_never_ask_the_backing(backing: DictBacking) -> None:
    p = program([EXP, COS])
    window(p, None, 0, (torch_compose._LOAD_GAP + 1) * torch_compose._BLOCK - 1)
    window(program([EXP, COS]), None, 100, 3_000)
    assert backing.loads == [] and backing.saves == []


def test_a_failing_store_costs_the_scan_and_changes_no_value(
    tmp_path: Any, plain: np.ndarray
) -> None:
    """The service's backing over a store that fails every call (here: its table is missing,
    the database never migrated): the scan is done instead, nothing raises, and what could not
    be written is counted as dropped."""
    from service.runs.checkpoints import StoredScans
    from service.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'scans.db'}")
    scans = StoredScans(store)
    set_scan_backing(scans)
    try:
        values = window(program([EXP, COS]), None, FAR, COUNT)
        assert scans.flush(10)
    finally:
        set_scan_backing(None)
        scans.close()
        store.close()
    assert_matches(values, plain[:, FAR:], RTOL)
    assert scans.loaded == 0 and scans.saved == 0 and scans.dropped > 0


# --- pricing from checkpoints (service.schedules.cost: check_work with resume) ---------------


def _from_block_start(p: Program, start: int, count: int, blocks_back: int = 0) -> int:
    """The cold price of the window whose scan covers what a window at ``start`` scans from
    the checkpoint ``blocks_back`` blocks before its own: the same steps, from near the
    chain's horizon (where cold and resumed scans are one)."""
    chain = chain_curve(p)
    offset = (start - chain.horizon) % chain._block + blocks_back * chain._block
    return p.work(chain.horizon + offset, count)


def test_a_window_is_priced_from_the_checkpoint_it_resumes_from(backing: DictBacking) -> None:
    p = program([EXP, COS])
    cold = p.work(FAR, COUNT)
    # Nothing computed yet, in this process or in the backing: the cold price.
    assert p.resumed_work(FAR, COUNT, {}) == cold
    window(p, None, FAR, COUNT)
    resumed = p.resumed_work(FAR, COUNT, {})
    assert resumed == _from_block_start(p, FAR, COUNT) < cold / 50
    # A budget between the two: refused cold, served resumed (and the refusal priced cold
    # still names a count that fits).
    budget = (resumed + cold) // 2
    with pytest.raises(WorkLimitExceeded):
        check_work(p, FAR, COUNT, budget, "w", window=True)
    assert check_work(p, FAR, COUNT, budget, "w", window=True, resume=True, state={}) == resumed
    # A restarted process prices from the backing's checkpoint (and keeps it in its memo:
    # the evaluation that follows reads nothing again and scans only after it).
    again = program([EXP, COS])
    assert again.resumed_work(FAR, COUNT, {}) == resumed
    loads, backing.saves[:] = len(backing.loads), []
    window(again, None, FAR, COUNT)
    assert len(backing.loads) == loads
    assert all(b > FAR // chain_curve(again)._block - 1 for _, b in backing.saves)
    # The promise to a trainer walking forward (state=None): a scan from at most _LOAD_GAP
    # blocks back, whatever is stored.
    gap = torch_compose._LOAD_GAP
    assert program([EXP, COS]).resumed_work(FAR, COUNT, None) == _from_block_start(
        p, FAR, COUNT, gap
    )


def test_a_checkpoint_of_another_state_is_not_priced(backing: DictBacking) -> None:
    nodes = [EXP, ROP, COS]
    p = program(nodes)
    state = feed(p, {100: 1.0, 50_000: 1.0})
    window(p, state, FAR, COUNT)
    cold, resumed = p.work(FAR, COUNT), p.resumed_work(FAR, COUNT, state)
    assert resumed < cold / 50
    # One more reduction before FAR: the checkpoints after it are stale for the new state,
    # which resumes from one before it (still far less than cold).
    grown, decision = p.observe(state, 120_000, {"loss": 1.0})
    assert decision["reduced"]
    assert resumed < p.resumed_work(FAR, COUNT, grown) < cold
    # Its own window then scans from there, and prices from its own checkpoints.
    window(p, grown, FAR, COUNT)
    assert p.resumed_work(FAR, COUNT, grown) == resumed


def test_restarted_sequential_segments_are_priced_from_their_checkpoints(
    backing: DictBacking,
) -> None:
    spec = ScheduleSpec.model_validate(
        {
            "groups": [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(LRS)],
            "schedule": {
                "type": "SequentialLR",
                "schedulers": [
                    {"type": "LinearLR", "start_factor": 0.5, "total_iters": 10},
                    {"type": "MultiplicativeLR", "lr_lambda": "0.99999"},
                ],
                "milestones": [1_000],
            },
        }
    )
    p = Program(spec)
    cold = p.work(FAR, COUNT)
    assert p.resumed_work(FAR, COUNT, {}) == cold
    p.evaluate(None, FAR, COUNT)
    assert p.resumed_work(FAR, COUNT, {}) < cold / 20
    assert Program(spec).resumed_work(FAR, COUNT, {}) == p.resumed_work(FAR, COUNT, {})
