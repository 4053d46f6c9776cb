"""HTTP-level hardening (issue 14), over a real uvicorn started by ``python -m service``.

- An abandoned ``?wait=`` report stops waiting (and polling) when its client disconnects.
- Read timeouts: a silent connection, half a request head and a body that never ends are
  closed (408 where something had been sent); an idle keep-alive connection too.
- A connection cap below the descriptor limit: with ``RLIMIT_NOFILE`` 256 and 300 sockets
  held open by clients that never finish a request, new requests are served, and an open
  ``?wait=`` request is not the one dropped.
- Uniform answers: 405 names every allowed method; a non-JSON body is 415 and a non-UTF-8
  body 422 ``validation-error`` on every route that takes a body.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.protocol import connection_cap
from service.cli import check_settings
from service.config import Settings
from tests.conftest import ROOT, ServerProcess, free_port
from tests.service.helpers import new_id, plateau_spec


def _spawn(tmp: Path, env: dict[str, str], nofile: int | None = None) -> ServerProcess:
    """``python -m service`` on a free port with extra ``LRSERVE_*`` settings and, with
    ``nofile``, that many file descriptors at most (soft and hard limit)."""
    port = free_port()
    database = f"sqlite:///{tmp / f'hardening-{port}.db'}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env)
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--database", database]
    cmd += ["--log-level", "warning"]

    def limit() -> None:  # (runs in the child, before exec)
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log_path = tmp / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            cwd=str(tmp),
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
            start_new_session=True,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", database, log_path, None, None)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"server not ready:\n{server.log()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with one-second read timeouts."""
    server = _spawn(
        tmp_path_factory.mktemp("quick"),
        {
            "LRSERVE_HEADER_TIMEOUT": "1",
            "LRSERVE_BODY_TIMEOUT": "1",
            "LRSERVE_KEEP_ALIVE_TIMEOUT": "1",
        },
    )
    yield server
    server.stop()


def _port(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _connect(server: ServerProcess, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=timeout)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the socket times out,
    which raises)."""
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def _gauge(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _report_request(run: str, step: int, rank: int, wait: float) -> bytes:
    body = json.dumps({"step": step, "rank": rank, "values": {"val_loss": 1.0}}).encode()
    return (
        f"POST /v1/runs/{run}/metrics?wait={wait} HTTP/1.1\r\nHost: t\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- abandoned waits ------------------------------------------------------------------------


def test_an_abandoned_wait_stops_when_its_client_disconnects(quick: ServerProcess) -> None:
    run = new_id("wait")
    with quick.client() as c:
        assert c.put(f"/v1/runs/{run}", json=plateau_spec(world_size=2)).status_code == 201
    abandoned_before = _gauge(quick, "lrserve_report_waits_abandoned_total")
    n = 60
    sockets = []
    for step in range(n):
        sock = _connect(quick)
        sock.sendall(_report_request(run, step, 0, 120))
        sockets.append(sock)
    assert _wait_for(lambda: _gauge(quick, "lrserve_report_waits") == n, 20), _gauge(
        quick, "lrserve_report_waits"
    )
    busy_start = _cpu_seconds(quick.process.pid)
    time.sleep(1.0)
    busy = _cpu_seconds(quick.process.pid) - busy_start
    for sock in sockets:
        sock.close()
    # Each wait notices the disconnect at its next poll (every 20 ms).
    assert _wait_for(lambda: _gauge(quick, "lrserve_report_waits") == 0, 5), (
        "waits kept going after their clients left"
    )
    assert _gauge(quick, "lrserve_report_waits_abandoned_total") - abandoned_before == n
    idle_start = _cpu_seconds(quick.process.pid)
    time.sleep(1.0)
    idle = _cpu_seconds(quick.process.pid) - idle_start
    print(f"server CPU: {busy:.3f} s/s with {n} waits, {idle:.3f} s/s after they left")
    # The reports themselves were stored: the run still takes rank 1's and completes.
    with quick.client() as c:
        done = c.post(f"/v1/runs/{run}/metrics", json={"step": 0, "rank": 1, "values": {}})
        assert done.status_code == 200 and done.json()["complete"] is True


def test_a_wait_still_answers_when_its_step_completes(quick: ServerProcess) -> None:
    run = new_id("wait")
    with quick.client() as c:
        assert c.put(f"/v1/runs/{run}", json=plateau_spec(world_size=2)).status_code == 201
    answer: dict[str, Any] = {}

    def rank0() -> None:
        with quick.client() as c:
            answer.update(
                c.post(
                    f"/v1/runs/{run}/metrics?wait=30",
                    json={"step": 5, "rank": 0, "values": {"val_loss": 1.0}},
                ).json()
            )

    thread = threading.Thread(target=rank0)
    thread.start()
    assert _wait_for(lambda: _gauge(quick, "lrserve_report_waits") >= 1, 10)
    with quick.client() as c:
        c.post(f"/v1/runs/{run}/metrics", json={"step": 5, "rank": 1, "values": {"val_loss": 1}})
    thread.join(10)
    assert answer["complete"] is True and answer["reported_ranks"] == 2


# -- read timeouts --------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_head_timeout(quick: ServerProcess) -> None:
    sock = _connect(quick)
    start = time.monotonic()
    assert _read_until_closed(sock) == b""  # closed without a word: nothing was asked
    assert 0.8 <= time.monotonic() - start <= 5
    sock.close()


def test_half_a_head_is_answered_408_and_closed(quick: ServerProcess) -> None:
    sock = _connect(quick)
    start = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    time.sleep(0.3)
    sock.sendall(b"still coming")  # bytes that keep trickling in do not extend the deadline
    answer = _read_until_closed(sock)
    assert 0.8 <= time.monotonic() - start <= 5
    assert answer.startswith(b"HTTP/1.1 408 ")
    problem = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert problem["type"] == "/problems/request-timeout"
    sock.close()


def test_a_body_that_never_ends_is_answered_408(quick: ServerProcess) -> None:
    sock = _connect(quick)
    sock.sendall(
        f"PUT /v1/runs/{new_id()} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        'Content-Length: 500\r\n\r\n{"groups": '.encode()
    )
    start = time.monotonic()
    answer = _read_until_closed(sock)
    assert 0.8 <= time.monotonic() - start <= 5
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"/problems/request-timeout" in answer
    sock.close()


def test_an_idle_keep_alive_connection_is_closed(quick: ServerProcess) -> None:
    sock = _connect(quick)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    start = time.monotonic()
    answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert time.monotonic() - start <= 5
    sock.close()


def test_a_request_split_over_packets_within_the_timeout_is_served(quick: ServerProcess) -> None:
    sock = _connect(quick)
    for part in (b"GET /heal", b"thz HTTP/1.1\r\nHo", b"st: t\r\nConnection: close\r\n\r\n"):
        sock.sendall(part)
        time.sleep(0.2)
    assert _read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
    sock.close()


# -- the connection cap ---------------------------------------------------------------------


def test_new_requests_are_served_while_300_connections_are_held(tmp_path: Path) -> None:
    # A head timeout far longer than the test: only the cap can make room.
    server = _spawn(tmp_path, {"LRSERVE_HEADER_TIMEOUT": "120"}, nofile=256)
    held: list[socket.socket] = []
    try:
        run = new_id("held")
        with server.client() as c:
            assert c.put(f"/v1/runs/{run}", json=plateau_spec(world_size=2)).status_code == 201
        # A trainer's report waiting for the other rank: a busy connection, never shed.
        waiter = _connect(server, timeout=60)
        waiter.sendall(_report_request(run, 1, 0, 60))
        assert _wait_for(lambda: _gauge(server, "lrserve_report_waits") == 1, 10)
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # half a head
            held.append(sock)
        served = 0
        start = time.monotonic()
        for _ in range(20):
            # A fresh connection each time, as a new client would open.
            r = httpx.get(f"{server.url}/healthz", timeout=10, headers={"Connection": "close"})
            served += r.status_code == 200
        elapsed = time.monotonic() - start
        # (Without the cap, accept() fails with EMFILE and each of these times out.)
        assert served == 20, server.log()[-3000:]
        # The waiting report was not dropped: it answers once rank 1 reports.
        with server.client() as c:
            c.post(f"/v1/runs/{run}/metrics", json={"step": 1, "rank": 1, "values": {}})
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = waiter.recv(65536)
            assert chunk, "the waiting report's connection was closed"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["complete"] is True
        waiter.close()
        # The server held no more connections than its cap (192 of 256 descriptors).
        open_fds = len(os.listdir(f"/proc/{server.process.pid}/fd"))
        assert open_fds < 256, open_fds
        print(f"20 requests in {elapsed:.2f} s with 300 held sockets; server fds {open_fds}")
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_the_cap_leaves_a_quarter_of_the_descriptors() -> None:
    assert connection_cap(0, 256) == 192
    assert connection_cap(0, 1024) == 768
    assert connection_cap(0, 100) == 36
    assert connection_cap(0, 40) == 16
    assert connection_cap(500, 256) == 500  # an explicit cap wins


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("header_timeout", 0.0),
        ("body_timeout", -1.0),
        ("keep_alive_timeout", 0),
        ("max_connections", -1),
    ],
)
def test_limits_out_of_range_are_refused_at_start(field: str, value: float) -> None:
    problem = check_settings(Settings(**{field: value}))  # type: ignore[arg-type]
    assert problem is not None and f"LRSERVE_{field.upper()}" in problem


# -- uniform answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/v1/runs/r1", "GET, PUT, DELETE"),
        ("POST", "/v1/runs/r1/lr", "GET"),
        ("PUT", "/v1/runs/r1/metrics", "GET, POST"),
        ("GET", "/v1/schedules/preview", "POST"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_405_lists_every_allowed_method(
    quick: ServerProcess, method: str, path: str, allowed: str
) -> None:
    r = httpx.request(method, quick.url + path, timeout=10)
    assert r.status_code == 405
    assert r.headers["allow"] == allowed
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/method-not-allowed"


BODY_ROUTES = [
    ("PUT", "/v1/runs/{run}"),
    ("POST", "/v1/schedules/preview"),
    ("POST", "/v1/runs/{run}/overrides"),
    ("POST", "/v1/runs/{run}/amendments"),
    ("POST", "/v1/runs/{run}/rewind"),
    ("POST", "/v1/runs/{run}/metrics"),
]


@pytest.fixture(scope="module")
def existing_run(quick: ServerProcess) -> str:
    run = new_id("body")
    with quick.client() as c:
        assert c.put(f"/v1/runs/{run}", json=plateau_spec()).status_code == 201
    return run


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_non_json_body_is_415_everywhere(
    quick: ServerProcess, existing_run: str, method: str, path: str, content_type: str
) -> None:
    body = json.dumps(plateau_spec()).encode()
    r = httpx.request(
        method,
        quick.url + path.format(run=existing_run),
        content=body,
        headers={"Content-Type": content_type},
        timeout=10,
    )
    assert r.status_code == 415, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/unsupported-media-type"
    assert content_type in r.json()["detail"]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_a_body_that_is_not_utf8_is_a_validation_error_everywhere(
    quick: ServerProcess, existing_run: str, method: str, path: str
) -> None:
    r = httpx.request(
        method,
        quick.url + path.format(run=existing_run),
        content=b'{"note": "caf\xe9"}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["type"] == "/problems/validation-error"
    assert problem["errors"][0]["loc"] == ["body"]
    assert "UTF-8" in problem["detail"]


def test_a_json_body_without_content_type_is_read_as_json(quick: ServerProcess) -> None:
    run = new_id("bare")
    body = json.dumps(plateau_spec()).encode()
    # httpx adds no Content-Type for raw bytes.
    r = httpx.put(f"{quick.url}/v1/runs/{run}", content=body, timeout=10)
    assert r.status_code == 201, r.text
    r = httpx.post(
        f"{quick.url}/v1/runs/{run}/metrics",
        content=b'{"step": 0, "rank": 0, "values": {"val_loss": 1.0}}',
        timeout=10,
    )
    assert r.status_code == 200, r.text
