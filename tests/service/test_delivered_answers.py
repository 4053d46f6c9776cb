"""Waiting reports answered by their step's completion in one pass (issue 12's fan-out).

When the report completing a step reaches the process its waiting ranks wait in, their
answers are written by that completion, past the ASGI stack (``Runs.report``'s ``deliver``
and the protocol's ``ANSWER_NOW``). Over real HTTP (raw sockets, to see the bytes) on SQLite
and PostgreSQL, step after step on the same keep-alive connections:

- every waiting rank gets the answer the completing rank got, but for its rank: torch's
  ``ReduceLROnPlateau`` values at ``step + 1``, the reduction included, and well-formed HTTP
  (status line, ``Content-Length`` that matches, JSON media type, no chunking);
- the connection stays usable afterwards (the next step's report on it is answered), a
  ``Connection: close`` request gets its close, and a rank that went away is not written to;
- ``lrserve_report_waits_delivered_total`` counts the answers delivered so, and no request
  is counted as a 500 (the middleware learns the status of an answer it never saw).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.conftest import ServerProcess
from tests.service.helpers import new_id, plateau_spec
from tests.service.test_ranks_scale import recorded, torch_plateau_lrs, until, waiting

RANKS = 6
METRICS_ROUTE = 'method="POST",path="/v1/runs/{run_id}/metrics"'


class RawConnection:
    """One keep-alive HTTP/1.1 connection on a plain socket."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        self.buffer = b""

    def post_report(
        self, run_id: str, step: int, rank: int, loss: float, close: bool = False
    ) -> None:
        body = json.dumps({"step": step, "rank": rank, "values": {"val_loss": loss}}).encode()
        head = (
            f"POST /v1/runs/{run_id}/metrics?wait=30 HTTP/1.1\r\nHost: test\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        self.sock.sendall(head.encode() + body)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[str, list[tuple[str, str]], bytes]:
        """The status line, the headers (names lower-cased, in order) and the body."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-head: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = [(k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines)]
        lengths = [int(v) for k, v in headers if k == "content-length"]
        assert len(lengths) == 1, headers
        while len(self.buffer) < lengths[0]:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[: lengths[0]], self.buffer[lengths[0] :]
        return status, headers, body

    def closed_by_server(self) -> bool:
        return not self.buffer and not self._fill()

    def close(self) -> None:
        self.sock.close()


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}" if labels else f"{name} "
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def delivered(server: ServerProcess) -> float:
    return metric(server, "lrserve_report_waits_delivered_total")


def answered(server: ServerProcess, status: int) -> float:
    return metric(server, "lrserve_http_requests_total", f'{METRICS_ROUTE},status="{status}"')


def expect_answer(
    raw: tuple[str, list[tuple[str, str]], bytes], rank: int, last: dict[str, Any]
) -> dict[str, Any]:
    status, headers, body = raw
    assert status == "HTTP/1.1 200 OK"
    names = [k for k, _ in headers]
    assert dict(headers)["content-type"] == "application/json"
    assert int(dict(headers)["content-length"]) == len(body)
    assert "transfer-encoding" not in names and len(set(names)) == len(names), headers
    assert "date" in names
    answer: dict[str, Any] = json.loads(body)
    assert answer["rank"] == rank
    assert {**answer, "rank": last["rank"]} == last
    return answer


def test_waiting_ranks_get_the_completing_answer_delivered(server: ServerProcess) -> None:
    losses = [1.0, 2.0, 3.0]  # worse and worse: patience 1, so the third step reduces
    expected = torch_plateau_lrs(losses, [0.1, 0.01], len(losses) + 1)
    run_id = new_id()
    conns = [RawConnection(server.url) for _ in range(RANKS - 1)]
    with server.client(timeout=60) as c:
        created = c.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=RANKS))
        assert created.status_code == 201, created.text
        version = created.json()["version"]
        gone = 2  # this rank's client goes away while waiting at step 1
        closing = 3  # this rank asks for Connection: close at step 2
        for step, loss in enumerate(losses):
            before = delivered(server), answered(server, 200), answered(server, 500)
            waits_before = waiting(server)
            for rank, conn in enumerate(conns):
                conn.post_report(run_id, step, rank, loss, close=step == 2 and rank == closing)
            if step == 1:
                conns[gone].close()
            since, live = version, RANKS - 1 - (step == 1)
            assert until(lambda v=since: recorded(server, run_id, v, RANKS - 1), 30)
            assert until(lambda n=waits_before + live: waiting(server) >= n, 30)
            time.sleep(0.3)  # (each waiter registers its delivery as its write returns)
            last = c.post(
                f"/v1/runs/{run_id}/metrics",
                json={"step": step, "rank": RANKS - 1, "values": {"val_loss": loss}},
            )
            assert last.status_code == 200, last.text
            last_answer = last.json()
            version = last_answer["version"]
            assert last_answer["complete"] and last_answer["reported_ranks"] == RANKS
            assert last_answer["groups"]["g0"]["lr"] == expected[step + 1][0]
            assert last_answer["groups"]["g1"]["lr"] == expected[step + 1][1]
            assert last_answer["decision"]["reduced"] == (expected[step + 1] != expected[step])
            for rank, conn in enumerate(conns):
                if step == 1 and rank == gone:
                    continue
                raw = conn.response()
                answer = expect_answer(raw, rank, last_answer)
                assert answer["applies_from"] == step + 1
                if step == 2 and rank == closing:
                    assert ("connection", "close") in raw[1]
                    assert conn.closed_by_server()
            if step == 1:
                conns[gone] = RawConnection(server.url)
            assert until(lambda n=waits_before: waiting(server) <= n, 30)
            after = delivered(server), answered(server, 200), answered(server, 500)
            assert after[0] - before[0] == live, (step, before, after)
            assert after[1] - before[1] == RANKS, (step, before, after)
            assert after[2] == before[2], "a delivered answer was counted as a 500"
    assert expected[3] != expected[2], "the scenario must include a reduction"
    for conn in conns:
        conn.close()


def test_a_waiting_report_that_times_out_is_answered_as_before(server: ServerProcess) -> None:
    """A wait that ends without its step completing is not delivered: the report's own task
    answers it (incomplete), on a connection that stays usable."""
    run_id = new_id()
    conn = RawConnection(server.url)
    with server.client() as c:
        assert c.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=2)).status_code == 201
    before = delivered(server)
    body = json.dumps({"step": 0, "rank": 0, "values": {"val_loss": 1.0}}).encode()
    head = (
        f"POST /v1/runs/{run_id}/metrics?wait=0.3 HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    conn.sock.sendall(head.encode() + body)
    status, _, raw = conn.response()
    assert status == "HTTP/1.1 200 OK"
    answer = json.loads(raw)
    assert answer["complete"] is False and answer["reported_ranks"] == 1
    assert delivered(server) == before
    # The same connection carries the next request.
    conn.sock.sendall(f"GET /v1/runs/{run_id} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    status, _, raw = conn.response()
    assert status == "HTTP/1.1 200 OK" and json.loads(raw)["id"] == run_id
    conn.close()
