"""The dependency arrows of docs/architecture.md, held to the code's imports.

api -> runs -> schedules; store implements runs.repository. A module may import its own
layer and the layers inside it, never one outside (imports under TYPE_CHECKING included).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"

# layer -> the layers (besides itself) it may import from
ALLOWED: dict[str, set[str]] = {
    "schedules": set(),
    "runs": {"schedules"},
    "store": {"runs.repository"},
    "api": {"runs", "schedules", "store", "config"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "service":
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            package = ".".join(path.relative_to(ROOT).with_suffix("").parts[: -node.level])
            out.append(f"{package}.{node.module}" if node.module else package)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
    return [m for m in out if m.startswith("service.")]


def test_dependencies_point_inward() -> None:
    wrong: list[str] = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((SERVICE / layer).rglob("*.py")):
            for module in _imports(path):
                target = _layer(module)
                if target is None or target == layer:
                    continue
                dotted = module.removeprefix("service.")
                if not any(dotted == a or dotted.startswith(a + ".") for a in allowed):
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert wrong == []


def test_only_the_composition_root_opens_a_store() -> None:
    """Routers reach runs through ``Runs``; only the app's wiring knows ``service.store``."""
    users = sorted(
        str(path.relative_to(ROOT))
        for path in (SERVICE / "api").rglob("*.py")
        if any(m == "service.store" or m.startswith("service.store.") for m in _imports(path))
    )
    assert users == ["service/api/deps.py"]


def test_routers_do_not_read_the_repository() -> None:
    for path in sorted((SERVICE / "api" / "routers").glob("*.py")):
        for module in _imports(path):
            assert not module.startswith("service.runs.repository"), path
            assert module != "service.runs.model" or path.name in {
                "runs.py",
                "overrides.py",
                "steering.py",
            }, f"{path.name} imports the run model; it should call a use case"
