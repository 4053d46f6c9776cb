"""``import lrserve`` needs only httpx: no FastAPI, torch, numpy or pydantic.

Each check runs a fresh interpreter with an import hook that makes the server-side and
heavy packages unimportable, as on a trainer that installed only the SDK.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from .conftest import sdk_env

BLOCKER = textwrap.dedent(
    """
    import sys

    BLOCKED = {"fastapi", "torch", "numpy", "pydantic", "starlette", "uvicorn", "service",
               "matplotlib", "psycopg"}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=sdk_env(),
        timeout=60,
    )


def test_import_without_server_or_torch() -> None:
    proc = run_python(
        """
        import lrserve, lrserve.cli
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in BLOCKED | {"numpy", "pydantic"})
        assert heavy == [], heavy
        client = lrserve.Client("http://127.0.0.1:9")
        assert callable(client.get_lr) and issubclass(lrserve.StaleReportError, lrserve.APIError)
        print("ok", lrserve.__version__)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")


def test_the_blocker_really_blocks() -> None:
    # Guards the test above against a hook that blocks nothing.
    proc = run_python("import fastapi")
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_torch_integration_is_lazy() -> None:
    proc = run_python(
        """
        import lrserve
        try:
            lrserve.torch
        except ImportError as exc:
            print("lazy", exc.name)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "lazy torch"


def test_serve_without_the_server_extra_says_what_to_install() -> None:
    proc = run_python(
        """
        from lrserve.cli import main
        raise SystemExit(main(["serve", "--port", "1"]))
        """
    )
    assert proc.returncode == 2, proc.stderr
    assert "install lrserve[server]" in proc.stderr


def test_lrserve_torch_without_torch_says_what_to_install() -> None:
    result = run_python(
        """
        try:
            import lrserve.torch
        except ModuleNotFoundError as exc:
            print("MESSAGE", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "MESSAGE lrserve.torch needs PyTorch" in result.stdout
    assert "pip install 'lrserve[torch]'" in result.stdout


def run_python_without(blocked: set[str], code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where exactly ``blocked`` cannot be imported."""
    # The hook reads BLOCKED when a module is looked up: rebinding it after the hook is in.
    blocker = BLOCKER + f"BLOCKED = set({sorted(blocked)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=sdk_env(),
        timeout=120,
    )


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("lrserve.torch", {"torch"}, "lrserve[torch]"),
        ("lrserve.lightning", {"lightning"}, "lrserve[lightning]"),
        ("lrserve.lightning", {"torch"}, "lrserve[lightning]"),
        ("lrserve.hf", {"transformers", "accelerate"}, "lrserve[hf]"),
        ("lrserve.hf", {"torch"}, "lrserve[hf]"),
        ("lrserve.keras", {"keras"}, "lrserve[keras]"),
        ("lrserve.optax", {"jax"}, "lrserve[jax]"),
    ],
)
def test_an_integration_without_its_framework_names_the_extra(
    module: str, blocked: set[str], extra: str
) -> None:
    """`import lrserve.X` without X's framework: an ImportError that says what to install."""
    proc = run_python_without(
        blocked,
        f"""
        try:
            import {module}
        except ImportError as exc:
            print("MESSAGE", exc)
        else:
            print("IMPORTED")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MESSAGE "), proc.stdout
    assert f"pip install '{extra}'" in proc.stdout, proc.stdout
    assert "(blocked)" not in proc.stdout  # not the bare "No module named ..." error
