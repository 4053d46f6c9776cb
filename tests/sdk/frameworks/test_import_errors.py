"""Importing an integration without its framework names the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.sdk.conftest import sdk_env

BLOCKER = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import {module}
    except ModuleNotFoundError as exc:
        print(exc)
    else:
        print("imported")
    """
)


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("lrserve.lightning", {"lightning"}, "lrserve[lightning]"),
        ("lrserve.hf", {"transformers"}, "lrserve[hf]"),
        ("lrserve.keras", {"keras"}, "lrserve[keras]"),
        ("lrserve.optax", {"jax"}, "lrserve[jax]"),
    ],
)
def test_missing_framework_names_the_extra(module: str, blocked: set[str], extra: str) -> None:
    code = BLOCKER.format(blocked=blocked, module=module)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=sdk_env(KERAS_BACKEND="torch"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert extra in proc.stdout, proc.stdout  # (the other tests import each one for real)
