"""Fixtures shared by every test suite: real servers, real databases.

- ``server_factory(database=None, token=None, read_token=None, args=(), env=None)`` starts
  ``python -m service`` as a subprocess on a free port (SQLite file under ``tmp_path`` by
  default), waits for ``/readyz`` and returns a :class:`ServerProcess` (``.url``,
  ``.database``, ``.process``, ``.token``, ``.stop()``, ``.kill()``, ``.log()``). Every server
  it started is stopped at teardown.
- ``live_server``: one server on a fresh SQLite file.
- ``postgres_url``: a fresh PostgreSQL database for the test, dropped afterwards. The admin
  URL is ``LRSERVE_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
  Unreachable server: ``pytest.fail`` when ``CI=true``, else ``pytest.skip``.
- ``db_url``: parametrised over ``sqlite`` and ``postgres`` for tests that must pass on both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from service.schedules import set_scan_backing

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A running ``python -m service`` subprocess."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        url: str,
        database: str,
        log_path: Path,
        token: str | None,
        read_token: str | None,
    ) -> None:
        self.process = process
        self.url = url
        self.database = database
        self.log_path = log_path
        self.token = token
        self.read_token = read_token

    @property
    def headers(self) -> dict[str, str]:
        """Authorization header for the read-write token (empty without one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client on this server carrying the read-write token."""
        kwargs.setdefault("timeout", 30.0)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``; returns the status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server (and its worker processes, which share its process group)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_server(
    tmp_dir: Path,
    database: str | None = None,
    token: str | None = None,
    read_token: str | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = 30.0,
) -> ServerProcess:
    # "--port N" in args restarts a server where its clients expect it (same URL).
    port = int(args[list(args).index("--port") + 1]) if "--port" in args else free_port()
    database = database or f"sqlite:///{tmp_dir / f'lrserve-{uuid.uuid4().hex[:8]}.db'}"
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--database", database]
    if token:
        cmd += ["--token", token]
    if read_token:
        cmd += ["--read-token", read_token]
    cmd += list(args)
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LRSERVE_") or k == "LRSERVE_TEST_POSTGRES"
    }
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    log_path = tmp_dir / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd,
            cwd=str(tmp_dir),
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: kill() takes the workers too
        )
    server = ServerProcess(
        process, f"http://127.0.0.1:{port}", database, log_path, token, read_token
    )
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode} before it was ready:\n"
                + server.log()[-4000:]
            )
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"server not ready after {ready_timeout} s:\n{server.log()[-4000:]}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _no_scan_backing_left() -> Iterator[None]:
    """A run service built in a test sets the process's scan-checkpoint backing (its store):
    unset it after the test, so later tests' programs do not use a closed store."""
    yield
    set_scan_backing(None)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def factory(
        database: str | None = None,
        token: str | None = None,
        read_token: str | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        server = start_server(tmp_path, database, token, read_token, args, env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
        if server.process.poll() is None:  # pragma: no cover - last resort
            server.kill()


@pytest.fixture
def live_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory()


def _admin_url() -> str:
    return os.environ.get("LRSERVE_TEST_POSTGRES", DEFAULT_ADMIN_URL)


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


@contextlib.contextmanager
def postgres_database(encoding: str | None = None) -> Iterator[str]:
    """Create a fresh PostgreSQL database, yield its URL, drop it afterwards.

    Skips (fails when ``CI=true``) when the server is unreachable. Usable from fixtures of
    any scope; ``postgres_url`` is the per-test form. ``encoding`` (e.g. ``"SQL_ASCII"``)
    creates the database with that server encoding instead of the cluster's default.
    """
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the dev extra installs it
        pytest.skip("psycopg is not installed")
    admin = _admin_url()
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL at {admin} is unreachable (CI=true): {exc}")
        pytest.skip(f"PostgreSQL at {admin} is unreachable: {exc}")
    name = f"lrserve_test_{uuid.uuid4().hex[:12]}"
    options = (
        f" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0" if encoding else ""
    )
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"{options}')
    try:
        yield _with_dbname(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped at teardown)."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL, once per dialect."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lrserve.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
