"""Server settings from the environment: a bad value stops the server with a message naming
it (never a traceback, never a silently ignored value)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.cli import check_settings
from service.config import Settings, SettingsError
from tests.conftest import ROOT, free_port


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("LRSERVE_CACHE_BYTES", "64M"),
        ("LRSERVE_PORT", "eighty"),
        ("LRSERVE_IDLE_AFTER", "nan"),
        ("LRSERVE_IDLE_AFTER", "inf"),
        ("LRSERVE_ALLOW_UNAUTHENTICATED", "maybe"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_variable(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: raw})
    assert name in str(err.value) and repr(raw) in str(err.value)


def test_values_parse_to_their_types() -> None:
    settings = Settings.from_env(
        {
            "LRSERVE_CACHE_BYTES": " 268_435_456 ",
            "LRSERVE_IDLE_AFTER": "12.5",
            "LRSERVE_ALLOW_UNAUTHENTICATED": "off",
            "LRSERVE_TOKEN": "t",
        }
    )
    assert settings.cache_bytes == 268_435_456
    assert settings.idle_after == 12.5
    assert settings.allow_unauthenticated is False
    assert settings.token == "t"
    assert check_settings(settings) is None


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"cache_bytes": -5}, "LRSERVE_CACHE_BYTES"),
        ({"cache_bytes": 1000}, "LRSERVE_CACHE_BYTES"),
        ({"compile_cache_bytes": 0}, "LRSERVE_COMPILE_CACHE_BYTES"),
        ({"max_request_work": 10}, "LRSERVE_MAX_REQUEST_WORK"),
        ({"pool_min": 5, "pool_max": 2}, "LRSERVE_POOL_MAX"),
        ({"busy_timeout_ms": -1}, "LRSERVE_BUSY_TIMEOUT_MS"),
        ({"wait_poll_seconds": 0.0}, "LRSERVE_WAIT_POLL_SECONDS"),
        ({"max_wait_seconds": 301.0}, "LRSERVE_MAX_WAIT_SECONDS"),
    ],
)
def test_out_of_range_budgets_are_refused(changes: dict[str, float], named: str) -> None:
    problem = check_settings(Settings(**changes))  # type: ignore[arg-type]
    assert problem is not None and named in problem


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("LRSERVE_CACHE_BYTES", "abc", "LRSERVE_CACHE_BYTES must be an integer, not 'abc'"),
        ("LRSERVE_CACHE_BYTES", "-5", "LRSERVE_CACHE_BYTES must be at least 1048576, not -5"),
    ],
)
def test_serve_stops_with_status_2_and_the_reason(
    tmp_path: os.PathLike[str], name: str, raw: str, says: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    env[name] = raw
    cmd = [sys.executable, "-m", "service", "--port", str(free_port())]
    cmd += ["--database", f"sqlite:///{tmp_path}/s.db"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr
