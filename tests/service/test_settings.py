"""Server settings from the environment: a bad value stops the server with a message naming
it (never a traceback, never a silently ignored value)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.cli import check_settings, parse_settings
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


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("LRSERVE_PORT", "abc", "LRSERVE_PORT must be an integer, not 'abc'"),
        ("LRSERVE_WORKERS", "2.5", "LRSERVE_WORKERS must be an integer, not '2.5'"),
        ("LRSERVE_BODY_TIMEOUT", "30s", "LRSERVE_BODY_TIMEOUT must be a number, not '30s'"),
        (
            "LRSERVE_ALLOW_UNAUTHENTICATED",
            "t",
            "LRSERVE_ALLOW_UNAUTHENTICATED must be one of 1/0, true/false, yes/no, on/off: 't'",
        ),
    ],
)
def test_the_message_says_what_the_variable_must_be(name: str, raw: str, says: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: raw})
    assert str(err.value) == says
    assert isinstance(err.value, ValueError)


def test_every_bad_variable_is_named() -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"LRSERVE_PORT": "x", "LRSERVE_IDLE_AFTER": "y", "LRSERVE_HOST": "h"})
    message = str(err.value)
    assert "LRSERVE_PORT" in message and "LRSERVE_IDLE_AFTER" in message
    assert "LRSERVE_HOST" not in message


def _every_field_changed() -> Settings:
    """Settings with a value other than its default in every field."""
    values: dict[str, object] = {}
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, bool):
            values[name] = not default
        elif isinstance(default, int):
            values[name] = default + 7
        elif isinstance(default, float):
            values[name] = default + 0.25
        else:  # a str, or None for the tokens
            values[name] = f"{name}-value"
    settings = Settings(**values)  # type: ignore[arg-type]
    assert all(getattr(settings, n) != f.default for n, f in Settings.model_fields.items())
    return settings


def test_to_env_round_trips_every_field() -> None:
    settings = _every_field_changed()
    env = settings.to_env()
    assert set(env) == {f"LRSERVE_{name.upper()}" for name in Settings.model_fields}
    assert Settings.from_env(env) == settings
    assert Settings.from_env(Settings().to_env()) == Settings()


def test_unset_or_empty_variables_keep_their_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    empty = {name: "" for name in _every_field_changed().to_env()}
    assert Settings.from_env(empty) == Settings()
    # Only the exact LRSERVE_* names are read: not another case, not the bare field name.
    assert Settings.from_env({"lrserve_port": "1", "LRSERVE_Port": "2", "port": "3"}) == Settings()


def test_only_from_env_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRSERVE_PORT", "8123")
    assert Settings().port == 8000
    assert Settings.from_env().port == 8123


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("LRSERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LRSERVE_PORT", "8123")
    monkeypatch.setenv("LRSERVE_IDLE_AFTER", "60")
    monkeypatch.setenv("LRSERVE_CACHE_BYTES", "2097152")
    monkeypatch.setenv("LRSERVE_ALLOW_UNAUTHENTICATED", "yes")
    settings = parse_settings(["--port", "9001", "--host", "0.0.0.0", "--token", "t"])
    assert (settings.port, settings.host, settings.token) == (9001, "0.0.0.0", "t")
    # The environment still counts where no flag was given.
    assert (settings.idle_after, settings.cache_bytes) == (60.0, 2097152)
    assert settings.allow_unauthenticated is True
    assert parse_settings(["--idle-after", "5"]).idle_after == 5.0


def test_tokens_never_show_in_repr_or_str() -> None:
    settings = Settings(token="rw-sekrit", read_token="ro-sekrit")
    for text in (repr(settings), str(settings), f"{settings!r}", repr([settings])):
        assert "sekrit" not in text
        assert "token='***'" in text and "read_token='***'" in text
        assert "port=8000" in text  # the rest is still shown
    assert "token=None" in repr(Settings())


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    changed = settings.model_copy(update={"port": 1})
    assert (settings.port, changed.port) == (8000, 1)


def test_auth_is_enabled_by_either_token() -> None:
    assert not Settings().auth_enabled
    assert Settings(token="t").auth_enabled
    assert Settings(read_token="r").auth_enabled


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
