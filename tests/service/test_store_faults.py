"""The server under database faults, on real databases and real servers (issue 14).

What must hold (docs/operations.md, "Failure modes"):

- PostgreSQL backends terminated under the pool (``pg_terminate_backend``, what a restart
  does to every session): the next requests all succeed; the pool drops the dead
  connections instead of handing each out once (one 503 "AdminShutdown" each, before).
- PostgreSQL unreachable (the network path to it cut, through a TCP proxy the test stops):
  every request answers 503 with ``Retry-After``, never 500; ``/healthz`` stays 200 and
  ``/readyz`` 503; once it is back the replica recovers by itself, within seconds.
- PostgreSQL down when the server starts: it starts anyway (it may come back) and recovers.
- A full disk under SQLite: ``/readyz`` 503 while full, reports 503 with the state unchanged,
  both 200 again once space is freed.
- An unwritable SQLite path (permission, read-only file system) or a non-UTF8 PostgreSQL
  database: ``lrserve serve`` (and uvicorn on the app factory) refuses to start, with a
  message that names the fix.

Mounts (tmpfs), ``chattr`` and ``pg_terminate_backend`` need root or a superuser: the tests
that need them skip without.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port, postgres_database
from tests.service.helpers import new_id, plateau_spec

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def report(c: httpx.Client, rid: str, step: int, loss: float = 1.0) -> httpx.Response:
    return c.post(f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": loss}})


def assert_503(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"].isdigit()
    body: dict[str, Any] = r.json()
    assert body["detail"]
    return body


def serve_exits(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python -m service`` expecting it to exit; (status, output)."""
    cmd = [sys.executable, "-m", "service", "--port", str(free_port()), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    try:
        done = subprocess.run(
            cmd, env=full_env, capture_output=True, text=True, timeout=30, cwd=tempfile.gettempdir()
        )
    except subprocess.TimeoutExpired as exc:  # it served instead of refusing
        raise AssertionError(f"the server did not refuse to start: {exc.stdout!r}") from exc
    return done.returncode, done.stdout + done.stderr


# -- PostgreSQL: terminated backends ---------------------------------------------------------


def _lrserve_backends(admin: Any, dbname: str) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'lrserve' AND datname = %s",
        (dbname,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def terminate_backends(url: str) -> int:
    """``pg_terminate_backend`` on every lrserve session of the database of ``url``, and wait
    until they have exited (so that the next requests meet dead connections, not dying
    ones). Returns how many there were."""
    import psycopg

    dbname = urlsplit(url).path.lstrip("/")
    with psycopg.connect(url, autocommit=True) as admin:
        pids = _lrserve_backends(admin, dbname)
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while set(pids) & set(_lrserve_backends(admin, dbname)):
            assert time.monotonic() < deadline, "terminated backends did not exit"
            time.sleep(0.02)
    return len(pids)


@pytest.mark.postgres
def test_terminated_backends_cost_no_request(
    server_factory: Callable[..., ServerProcess], postgres_url: str
) -> None:
    srv = server_factory(database=postgres_url)
    rid = new_id("term")
    with srv.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
        # Concurrent reads open several pool connections; all of them are then terminated.
        with ThreadPoolExecutor(8) as pool:
            warm = Counter(pool.map(lambda _: c.get(f"/v1/runs/{rid}").status_code, range(64)))
        assert warm == {200: 64}
        for round_ in range(2):  # twice: the replacements must be checked the same way
            assert terminate_backends(postgres_url) >= 1
            statuses: Counter[int] = Counter()
            for step in range(10 * round_, 10 * round_ + 10):
                statuses[report(c, rid, step, 1.0 - step / 100).status_code] += 1
                statuses[c.get(f"/v1/runs/{rid}").status_code] += 1
                statuses[c.get(f"/v1/runs/{rid}/lr", params={"step": step}).status_code] += 1
            assert statuses == {200: 30}, statuses
        run = c.get(f"/v1/runs/{rid}").json()
        assert run["completed_step"] == 19 and run["version"] == 21
        assert c.get("/readyz").status_code == 200


@pytest.mark.postgres
def test_read_only_database_is_not_ready(
    server_factory: Callable[..., ServerProcess], postgres_url: str
) -> None:
    import psycopg

    srv = server_factory(database=postgres_url)
    dbname = urlsplit(postgres_url).path.lstrip("/")
    rid = new_id("ro")
    with srv.client() as c, psycopg.connect(postgres_url, autocommit=True) as admin:
        assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
        admin.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
        try:
            terminate_backends(postgres_url)  # new sessions get the setting
            time.sleep(1.1)  # past the readiness answer's cache
            assert "read-only" in assert_503(c.get("/readyz"))["detail"]
            body = assert_503(report(c, rid, 0))
            assert "read-only" in body["detail"] and "primary" in body["detail"], body
            assert c.get(f"/v1/runs/{rid}").json()["version"] == 1  # reads go on
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        terminate_backends(postgres_url)
        wait_until_ok(c, rid, 10.0)
        assert report(c, rid, 0).status_code == 200


# -- PostgreSQL: unreachable, then back ------------------------------------------------------


class TcpProxy:
    """A TCP forwarder on a fixed local port to PostgreSQL: ``stop()`` closes the listener and
    cuts every forwarded connection (what a replica sees when the database host goes away);
    ``start()`` listens again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            cut, self._open = self._open, []
        for s in cut:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextlib.contextmanager
def proxied(url: str, listening: bool = True) -> Iterator[tuple[TcpProxy, str]]:
    """A :class:`TcpProxy` to the PostgreSQL of ``url`` and the URL through it."""
    parts = urlsplit(url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    through = urlunsplit(
        (parts.scheme, f"{netloc[0]}@{host}" if len(netloc) == 2 else host, parts.path, "", "")
    )
    if listening:
        proxy.start()
    try:
        yield proxy, through
    finally:
        proxy.stop()


def wait_until_ok(c: httpx.Client, rid: str, limit_s: float) -> tuple[float, Counter[int]]:
    """Poll ``/readyz`` and a read until both are 200; (seconds it took, other statuses)."""
    t0 = time.monotonic()
    seen: Counter[int] = Counter()
    while True:
        ready = c.get("/readyz")
        read = c.get(f"/v1/runs/{rid}")
        if ready.status_code == 200 and read.status_code == 200:
            return time.monotonic() - t0, seen
        for r in (ready, read):
            if r.status_code != 200:
                assert_503(r)
                seen[r.status_code] += 1
        assert time.monotonic() - t0 < limit_s, f"not recovered after {limit_s} s: {read.text}"
        time.sleep(0.2)


OUTAGE_S = 20.0
"""Long enough for psycopg_pool's default back-off (1, 2, 4, 8, 16 s...) to have left the
next reconnection attempt ~10 s after the database is back: recovery must not wait for it."""


@pytest.mark.postgres
def test_database_outage_is_503_then_recovers(
    server_factory: Callable[..., ServerProcess], postgres_url: str
) -> None:
    with proxied(postgres_url) as (proxy, url):
        srv = server_factory(database=url)  # the default busy timeout: 5 s
        rid = new_id("down")
        with srv.client() as c:
            assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
            assert report(c, rid, 0).status_code == 200
            proxy.stop()
            time.sleep(1.1)  # past the readiness answer's cache (1 s)
            down_until = time.monotonic() + OUTAGE_S
            statuses, latencies = Counter[int](), []
            while time.monotonic() < down_until:
                for call in (
                    lambda: report(c, rid, 1),
                    lambda: c.get(f"/v1/runs/{rid}"),
                    lambda: c.get("/readyz"),
                ):
                    t0 = time.monotonic()
                    body = assert_503(call())
                    latencies.append(time.monotonic() - t0)
                    statuses[503] += 1
                    assert "PostgreSQL" in body["detail"], body
                assert c.get("/healthz").status_code == 200  # alive: do not restart it
                time.sleep(0.5)
            assert "Connection refused" in body["detail"], body  # the reason, for operators
            # Once a connection attempt has failed, a 503 comes at once, not after 5 s.
            assert sorted(latencies)[-2] < 1.0, latencies
            proxy.start()
            took, _ = wait_until_ok(c, rid, 10.0)
            print(f"recovered {took:.2f} s after the database came back")
            assert took < 4.0, f"recovered {took:.1f} s after the database came back"
            assert report(c, rid, 1).status_code == 200  # the refused report, sent again
            run = c.get(f"/v1/runs/{rid}").json()
            assert run["completed_step"] == 1 and run["version"] == 3  # nothing half-applied


@pytest.mark.postgres
def test_database_down_at_start_then_up(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, postgres_url: str
) -> None:
    from tests.conftest import start_server

    with proxied(postgres_url, listening=False) as (proxy, url):
        port = free_port()
        # start_server waits for /readyz 200: start it in a thread, bring the database up after.
        started: list[ServerProcess] = []
        thread = threading.Thread(
            target=lambda: started.append(
                start_server(
                    tmp_path,
                    url,
                    args=["--port", str(port)],
                    env={"LRSERVE_BUSY_TIMEOUT_MS": "1000"},
                )
            )
        )
        thread.start()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # serving, not ready
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start without its database"
            time.sleep(0.1)
        t0 = time.monotonic()
        body = assert_503(httpx.get(f"{base}/readyz", timeout=10))
        assert time.monotonic() - t0 < 2.5, "a readiness probe waited longer than probes do"
        assert "PostgreSQL" in body["detail"]
        assert_503(httpx.put(f"{base}/v1/runs/{new_id()}", json=plateau_spec(), timeout=10))
        proxy.start()
        thread.join(40)
        assert started, "the server never became ready once its database was up"
        srv = started[0]
        try:
            with srv.client() as c:
                rid = new_id("late")
                assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
                assert report(c, rid, 0).status_code == 200
        finally:
            srv.stop()


# -- SQLite: a full disk ---------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(size: str, options: str = "") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (root only; skips otherwise)."""
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix="lrserve-fs-"))
    opts = f"size={size}" + (f",{options}" if options else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until the file system is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    return filler


def test_full_disk_sqlite(server_factory: Callable[..., ServerProcess]) -> None:
    with tmpfs("8m") as disk:
        srv = server_factory(
            database=f"sqlite:///{disk / 'lrserve.db'}",
            env={"LRSERVE_MIN_FREE_BYTES": str(1 << 20)},
        )
        rid = new_id("full")
        with srv.client() as c:
            assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
            for step in range(3):
                assert report(c, rid, step).status_code == 200
            before = c.get(f"/v1/runs/{rid}").json()
            events = c.get(f"/v1/runs/{rid}/events").json()
            filler = fill(disk)
            time.sleep(1.1)  # past the readiness answer's cache
            body = assert_503(c.get("/readyz"))
            assert "free" in body["detail"]
            for step in range(3, 6):
                body = assert_503(report(c, rid, step, 0.5))
                assert "full" in body["detail"], body
            assert_503(c.put(f"/v1/runs/{new_id()}", json=plateau_spec()))
            assert c.get(f"/v1/runs/{rid}").json() == before  # reads go on; nothing changed
            assert c.get(f"/v1/runs/{rid}/events").json() == events
            assert c.get("/healthz").status_code == 200
            filler.unlink()
            took, _ = wait_until_ok(c, rid, 15.0)
            for step in range(3, 6):
                assert report(c, rid, step, 0.5).status_code == 200
            after = c.get(f"/v1/runs/{rid}").json()
            assert after["completed_step"] == 5 and after["version"] == before["version"] + 3
        assert took < 10.0


# -- permanent faults refuse the start -------------------------------------------------------


@contextlib.contextmanager
def unwritable_directory(existing_db: bool) -> Iterator[Path]:
    """A directory the server's user cannot create files in: ``chmod 555`` (root ignores
    that: then ``chattr +i``, which stops root too)."""
    where = Path(tempfile.mkdtemp(prefix="lrserve-perm-"))
    if existing_db:
        import sqlite3

        sqlite3.connect(where / "lrserve.db").close()
    try:
        if IS_ROOT:
            done = subprocess.run(["chattr", "+i", str(where)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
        else:
            where.chmod(0o555)
        yield where
    finally:
        if IS_ROOT:
            subprocess.run(["chattr", "-i", str(where)], check=False)
        where.chmod(0o755)
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("existing_db", [False, True], ids=["new-file", "existing-file"])
def test_unwritable_sqlite_directory_refuses_start(existing_db: bool) -> None:
    with unwritable_directory(existing_db) as where:
        status, out = serve_exits(["--database", f"sqlite:///{where / 'lrserve.db'}"])
    assert status == 2, out
    assert f"cannot write {where / 'lrserve.db'}: permission denied" in out, out
    assert f"writable by uid {os.geteuid()}" in out and "LRSERVE_DATABASE" in out, out
    assert "StoreBusy" not in out and "Traceback" not in out, out


def test_read_only_file_system_refuses_start() -> None:
    with tmpfs("1m", "ro") as where:
        status, out = serve_exits(["--database", f"sqlite:///{where / 'lrserve.db'}"])
        # ... and on the app factory started by uvicorn itself (its lifespan refuses):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
        env |= {"PYTHONPATH": str(ROOT), "LRSERVE_DATABASE": f"sqlite:///{where / 'x.db'}"}
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:app_from_env"]
        done = subprocess.run(
            [*cmd, "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=30
        )
    assert status == 2, out
    assert "read-only file system" in out and "mount the volume read-write" in out, out
    assert done.returncode == 3, done.stderr  # uvicorn's "startup failed"
    assert "read-only file system" in done.stderr and "store_fault" in done.stderr, done.stderr


def test_missing_directory_refuses_start(tmp_path: Path) -> None:
    status, out = serve_exits(["--database", f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"])
    assert status == 2 and "does not exist" in out and "LRSERVE_DATABASE" in out, out


def test_not_a_database_refuses_start(tmp_path: Path) -> None:
    db = tmp_path / "lrserve.db"
    db.write_bytes(b"this is not an SQLite file" * 100)
    status, out = serve_exits(["--database", f"sqlite:///{db}"])
    assert status == 2 and "not a usable SQLite database" in out, out
    assert db.read_bytes() == b"this is not an SQLite file" * 100  # left as it was


@pytest.mark.postgres
def test_sql_ascii_database_refuses_start() -> None:
    with postgres_database(encoding="SQL_ASCII") as url:
        status, out = serve_exits(["--database", url])
        assert status == 2, out
        assert "encoding SQL_ASCII; lrserve needs UTF8" in out, out
        assert "CREATE DATABASE lrserve ENCODING 'UTF8'" in out, out
        import psycopg

        with psycopg.connect(url) as conn:  # nothing was created in it
            assert conn.execute("SELECT to_regclass('runs')").fetchone() == (None,)
