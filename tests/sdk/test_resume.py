"""Resume from RemoteScheduler.state_dict() in a new process, across a service restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.sdk.torch_support import (
    TWO_GROUP_SPEC,
    assert_same,
    load_seen,
    restart_same_port,
    trainer,
    two_group_expected,
)


@pytest.mark.slow
def test_resume_in_a_new_process_after_a_service_restart(
    live_server: Any, server_factory: Any, tmp_path: Path
) -> None:
    common = {"url": live_server.url, "run": "resume", "report_every": 10}
    ckpt = tmp_path / "ckpt.pt"
    trainer(
        {
            **common,
            "spec": TWO_GROUP_SPEC,
            "steps": 170,
            "save": str(ckpt),
            "out": str(tmp_path / "a.json"),
        }
    )
    live_server.stop()
    restart_same_port(live_server, server_factory)
    # The second process attaches (no spec) and continues from the checkpoint.
    trainer(
        {**common, "spec": None, "steps": 300, "load": str(ckpt), "out": str(tmp_path / "b.json")}
    )
    first, second = load_seen(tmp_path / "a.json"), load_seen(tmp_path / "b.json")
    assert min(second) == 170 and max(second) == 300
    assert second[170] == first[170]
    expected = two_group_expected(300, 10, 1)
    for s in range(301):
        assert_same((first if s <= 170 else second)[s], expected[s], f"step {s}")
    # The plateau reduced after the resume, from state the restarted server kept.
    assert expected[300][1][0] < expected[170][1][0]
