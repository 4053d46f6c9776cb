"""Static checks of the packaging: Dockerfile, .dockerignore, docker-compose.yml, deploy/nginx.conf.

There is no Docker engine on the development machine, so these tests check what can be checked
without one: the compose file's structure (parsed with PyYAML when it is installed; it is not a
dependency of lrserve), that the image's HEALTHCHECK command really probes a live server, that the
build context contains what the Dockerfile copies, and nginx's own syntax check when nginx is on
PATH.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions(DOCKERFILE)
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    stage = _final_stage()
    assert stage[0][1].split()[0] == "python:3.11-slim"
    users = [args for k, args in stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("EXPOSE", "8000") in stage
    cmd = json.loads(next(args for k, args in stage if k == "CMD"))
    assert cmd[:2] == ["lrserve", "serve"] and "0.0.0.0" in cmd
    # The token must come from the environment at run time, never from the image.
    assert "LRSERVE_TOKEN" not in " ".join(args for k, args in stage if k in {"ENV", "ARG"})
    assert any(k == "HEALTHCHECK" for k, _ in stage)
    installs = [
        args for k, args in _instructions(DOCKERFILE) if k == "RUN" and "pip install" in args
    ]
    assert any(".[server,postgres]" in args for args in installs)


def _healthcheck_cmd() -> list[str]:
    args = next(args for k, args in _final_stage() if k == "HEALTHCHECK")
    cmd: list[str] = json.loads(args[args.index("CMD") + len("CMD") :].strip())
    assert cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


def test_healthcheck_command_probes_a_live_server(live_server: Any) -> None:
    """The exact HEALTHCHECK command exits 0 against a running lrserve and 1 against nothing."""
    port = live_server.url.rsplit(":", 1)[1]
    ok = subprocess.run(_healthcheck_cmd(), env={**os.environ, "LRSERVE_PORT": port}, timeout=30)
    assert ok.returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = str(s.getsockname()[1])
    down = subprocess.run(
        _healthcheck_cmd(),
        env={**os.environ, "LRSERVE_PORT": closed},
        capture_output=True,
        timeout=30,
    )
    assert down.returncode != 0


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; "!" re-includes."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        pat_re = pat.replace("**/", "*").replace("**", "*")
        if any(fnmatch.fnmatchcase(p, pat_re) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for k, args in _instructions(DOCKERFILE):
        if k == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    assert {"pyproject.toml", "service", "clients"} <= set(sources)
    for src in sources:
        assert not _ignored(src, patterns), src
    for package_file in ("service/__init__.py", "clients/lrserve/__init__.py"):
        assert not _ignored(package_file, patterns)
    assert _ignored("tests/test_deploy.py", patterns)
    assert _ignored(".venv/bin/python", patterns)
    assert _ignored("service/__pycache__/x.pyc", patterns)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (test-only check)")
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def test_compose_has_postgres_two_replicas_and_a_load_balancer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    volume = pg["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]

    for name in ("lrserve-1", "lrserve-2"):
        svc = services[name]
        env = svc["environment"]
        assert env["LRSERVE_DATABASE"].startswith("postgresql://")
        assert "@postgres:5432/" in env["LRSERVE_DATABASE"]
        # Interpolated from the caller's environment, and required.
        assert re.fullmatch(r"\$\{LRSERVE_TOKEN:\?[^}]*\}", env["LRSERVE_TOKEN"])
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["build"] == "."

    lb = services["lb"]
    mounts = [v.split(":") for v in lb["volumes"]]
    assert any(src == "./deploy/nginx.conf" for src, *_ in mounts)
    assert set(lb["depends_on"]) == {"lrserve-1", "lrserve-2"}
    # Only the load balancer is published.
    assert [n for n, s in services.items() if "ports" in s] == ["lb"]


def test_nginx_upstream_names_every_replica(compose: dict[str, Any]) -> None:
    upstream = re.search(r"upstream\s+lrserve\s*\{(.*?)\}", NGINX_CONF, re.S)
    assert upstream
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):8000", upstream.group(1), re.M))
    replicas = {n for n in compose["services"] if n.startswith("lrserve-")}
    assert servers == replicas
    assert re.search(r"listen\s+8000;", NGINX_CONF)
    # ?wait= may hold a response for 300 s: the proxy must wait longer.
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", NGINX_CONF)
    assert read_timeout and int(read_timeout.group(1)) > 300


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_config_syntax(tmp_path: Path) -> None:
    # The replica names only resolve inside the compose network; point them at loopback.
    conf = re.sub(r"lrserve-\d+:8000", "127.0.0.1:8000", NGINX_CONF)
    conf = conf.replace("/dev/stdout", str(tmp_path / "access.log"))
    (tmp_path / "nginx.conf").write_text(conf)
    result = subprocess.run(
        ["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
