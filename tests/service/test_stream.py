"""``GET /v1/runs/{id}/stream``: server-sent events from a real uvicorn server over HTTP.

Each test reads the stream on a thread (httpx, line by line) while the main thread changes
the run; the server's own gauges (``/metrics``) show streams stop when clients go away.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, postgres_database, start_server
from tests.service.helpers import new_id
from tests.service.test_runs_api import problem

SPEC = {"groups": [{"name": "g", "lr": 0.1}], "schedule": {"type": "StepLR", "step_size": 5}}
KEEPALIVE = 4.0


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp(f"stream-{request.param}")
    env = {
        "LRSERVE_STREAM_KEEPALIVE_SECONDS": str(KEEPALIVE),
        # The tests' client sits idle while a stream waits for its keep-alive (4 s and more on
        # a loaded machine): with uvicorn's 5 s, the server closed that connection just as the
        # client sent its next request on it ("Server disconnected without sending a response").
        "LRSERVE_KEEP_ALIVE_TIMEOUT": "60",
    }
    kwargs: dict[str, Any] = {"token": "rw", "read_token": "ro", "env": env}
    if request.param == "sqlite":
        srv = start_server(tmp, f"sqlite:///{tmp / 'lrserve.db'}", **kwargs)
        try:
            yield srv
        finally:
            srv.stop()
        return
    with postgres_database() as url:
        srv = start_server(tmp, url, **kwargs)
        try:
            yield srv
        finally:
            srv.stop()


class Reader:
    """The stream's lines on a queue, read by a thread; ``close()`` drops the connection."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._client = httpx.Client(timeout=httpx.Timeout(30.0))
        self._response = self._client.send(
            self._client.build_request("GET", url, **kwargs), stream=True
        )
        self.status = self._response.status_code
        self.headers = self._response.headers
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines():
                self.lines.put(line)
        except httpx.HTTPError:
            pass
        finally:
            self.lines.put(None)  # the end of the stream

    def event(self, timeout: float = 10.0) -> tuple[str, Any]:
        """The next event (``name``, data) or comment (``":"``, text); ``("end", None)``."""
        name, data = None, None
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                return "end", None
            if line.startswith(":"):
                return ":", line[1:].strip()
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
            elif line == "" and name is not None:
                return name, data

    def close(self) -> None:
        self._response.close()
        self._client.close()


def gauge(srv: ServerProcess, name: str) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def test_events_follow_every_change_of_the_run(server: ServerProcess, client: httpx.Client) -> None:
    rid = new_id("st")
    assert client.put(f"/v1/runs/{rid}", json=SPEC).status_code == 201
    # The browser's EventSource sends no header: the read-only token in the URL.
    reader = Reader(f"{server.url}/v1/runs/{rid}/stream", params={"token": "ro"})
    try:
        assert reader.status == 200
        assert reader.headers["content-type"].startswith("text/event-stream")
        first = reader.event()
        assert first == (
            "run",
            {"version": 1, "step": None, "completed_step": None, "status": "idle", "branch": 0},
        )
        t0 = time.monotonic()
        body = {"step": 4, "values": {"loss": 0.5}}
        assert client.post(f"/v1/runs/{rid}/metrics", json=body).status_code == 200
        name, data = reader.event()
        assert name == "run" and data["version"] == 2 and data["step"] == 4
        assert data["completed_step"] == 4 and data["status"] == "running"
        assert time.monotonic() - t0 < 3.0  # one poll a second
        override = {"from_step": 100, "action": "scale", "value": 0.5}
        assert client.post(f"/v1/runs/{rid}/overrides", json=override).status_code == 201
        assert reader.event()[1]["version"] == 3
        assert client.post(f"/v1/runs/{rid}/rewind", json={"to_step": 2}).status_code == 200
        name, data = reader.event()
        assert data["branch"] == 1 and data["step"] is None and data["version"] == 4
        # Nothing changes: a keep-alive comment, and no event.
        assert reader.event(timeout=KEEPALIVE + 3) == (":", "keep-alive")
        # A heartbeat that finishes the run changes its status, not its version.
        hb = {"finished": True}
        assert client.post(f"/v1/runs/{rid}/heartbeat", json=hb).status_code == 204
        assert reader.event() == (
            "run",
            {"version": 4, "step": None, "completed_step": None, "status": "finished", "branch": 1},
        )
        assert client.delete(f"/v1/runs/{rid}").status_code == 204
        assert reader.event() == ("deleted", {"run": rid})
        assert reader.event() == ("end", None)
    finally:
        reader.close()
    wait_for(lambda: gauge(server, "lrserve_streams_open") == 0)


def test_a_client_going_away_stops_its_stream(server: ServerProcess, client: httpx.Client) -> None:
    rid = new_id("st")
    assert client.put(f"/v1/runs/{rid}", json=SPEC).status_code == 201
    wait_for(lambda: gauge(server, "lrserve_streams_open") == 0)
    readers = [
        Reader(f"{server.url}/v1/runs/{rid}/stream", headers={"Authorization": "Bearer rw"})
        for _ in range(3)
    ]
    try:
        for reader in readers:
            assert reader.event()[0] == "run"
        assert gauge(server, "lrserve_streams_open") == 3
        polls = gauge(server, "lrserve_stream_polls_total")
        time.sleep(2.2)
        # About one point read per second per stream, not more.
        made = gauge(server, "lrserve_stream_polls_total") - polls
        assert 3 <= made <= 3 * 4, made
    finally:
        for reader in readers:
            reader.close()
    # Gone within a keep-alive period. Not sooner for sure: each reader's thread is blocked in
    # recv() on its socket, and Linux sends the FIN of a socket closed by another thread only
    # when that recv() returns, i.e. at the server's next write (the keep-alive, 4 s here).
    # The disconnect was seen promptly in runs where the FIN went out at once (within 2 s).
    wait_for(lambda: gauge(server, "lrserve_streams_open") == 0, timeout=KEEPALIVE + 4.0)
    polls = gauge(server, "lrserve_stream_polls_total")
    time.sleep(2.0)
    assert gauge(server, "lrserve_stream_polls_total") == polls


def test_stream_refusals(server: ServerProcess) -> None:
    problem(httpx.get(f"{server.url}/v1/runs/{new_id()}/stream?token=ro"), 404, "run-not-found")
    problem(httpx.get(f"{server.url}/v1/runs/x/stream"), 401, "unauthorized")
    problem(httpx.get(f"{server.url}/v1/runs/x/stream?token=wrong"), 401, "unauthorized")
    problem(httpx.get(f"{server.url}/v1/runs/x/stream?token="), 401, "unauthorized")
    problem(httpx.get(f"{server.url}/v1/runs/a%20b/stream?token=ro"), 422, "validation-error")
