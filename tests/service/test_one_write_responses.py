"""A response of known length leaves lrserve's HTTP protocol in one write (head and body),
and a request leaves nothing for the cyclic garbage collector.

The protocol runs on a real event loop over a real ``SOCK_SEQPACKET`` socket pair: such a
socket keeps each ``send`` a record of its own, so the client side counts the server's
writes exactly (over TCP two writes may arrive as one read, or one as two).
(asyncio takes only stream sockets: the server end is handed over as one, which it is in
every way the transport uses.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.config import Config
from uvicorn.server import ServerState

from service.api.protocol import GuardedHttpToolsProtocol


async def _json(request: Request) -> Response:
    if request.method == "POST":
        return JSONResponse({"got": len(await request.body())})
    return JSONResponse({"value": 0.1, "pad": "x" * 100})


async def _empty(request: Request) -> Response:
    return Response(status_code=204)


async def _stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(0.05)
        yield b"second"

    return StreamingResponse(chunks(), media_type="text/plain")


APP = Starlette(
    routes=[
        Route("/json", _json, methods=["GET", "HEAD", "POST"]),
        Route("/empty", _empty),
        Route("/stream", _stream),
    ]
)


def _seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """(server end, client end): the server end labelled a stream socket for asyncio."""
    server_side, client_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, server_side.detach())
    server_side.setblocking(False)
    client_side.setblocking(False)
    return server_side, client_side


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[socket.socket]:
    """The protocol serving ``APP`` on one end of a seqpacket pair; yields the client end."""
    loop = asyncio.get_running_loop()
    server_side, client_side = _seqpacket_pair()
    config = Config(APP, lifespan="off", access_log=False, log_level="warning")
    config.load()
    state = ServerState()
    transport, _ = await loop.connect_accepted_socket(
        lambda: GuardedHttpToolsProtocol(config=config, server_state=state, app_state={}),
        server_side,
    )
    try:
        yield client_side
    finally:
        transport.close()
        client_side.close()


async def _records(request: bytes, expect: int, gap: float = 0.3) -> list[bytes]:
    """The server's writes for ``request``: records read until ``expect`` arrived and none
    came for ``gap`` seconds after."""
    loop = asyncio.get_running_loop()
    records: list[bytes] = []
    async with _served() as client_side:
        await loop.sock_sendall(client_side, request)
        while True:
            try:
                record = await asyncio.wait_for(loop.sock_recv(client_side, 65536), gap)
            except TimeoutError:
                if len(records) >= expect:
                    return records
                raise
            if not record:
                return records
            records.append(record)


def _run(request: bytes, expect: int) -> list[bytes]:
    return asyncio.run(_records(request, expect))


def test_a_json_answer_is_one_write() -> None:
    records = _run(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert len(records) == 1
    head, body = records[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and body.startswith(b'{"value":0.1')


def test_keep_alive_answers_are_one_write_each() -> None:
    request = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"
    records = _run(request * 3, 3)
    assert len(records) == 3
    assert all(r.startswith(b"HTTP/1.1 200") and r.endswith(b"}") for r in records)


def test_a_body_after_100_continue_is_answered_after_the_interim_head() -> None:
    body = b'{"a": 1}'
    head = (
        b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )

    async def exchange() -> list[bytes]:
        loop = asyncio.get_running_loop()
        async with _served() as client_side:
            await loop.sock_sendall(client_side, head)
            interim = await asyncio.wait_for(loop.sock_recv(client_side, 65536), 2)
            await loop.sock_sendall(client_side, body)
            answer = await asyncio.wait_for(loop.sock_recv(client_side, 65536), 2)
            return [interim, answer]

    interim, answer = asyncio.run(exchange())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # not held back for the answer
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"got":8}')


@pytest.mark.parametrize(
    ("request_line", "status"),
    [(b"HEAD /json", b"200"), (b"GET /empty", b"204")],
    ids=["head", "no-content"],
)
def test_an_answer_without_a_body_still_sends_its_head(request_line: bytes, status: bytes) -> None:
    records = _run(request_line + b" HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert len(records) == 1 and records[0].startswith(b"HTTP/1.1 " + status)
    assert records[0].endswith(b"\r\n\r\n")


def test_a_streamed_answer_sends_its_head_before_the_first_chunk() -> None:
    records = _run(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", 3)
    assert records[0].startswith(b"HTTP/1.1 200") and records[0].endswith(b"\r\n\r\n")
    assert b"first" in records[1] and b"second" in b"".join(records[2:])


def test_requests_leave_no_garbage_for_the_cyclic_collector() -> None:
    """A request's objects are freed as it ends, by reference counting: none of them form a
    reference cycle (the protocol's write wrapper holds its request's cycle weakly), so a busy
    server leaves the cyclic collector nothing to do. Answered requests by the hundred with
    the collector off, then one collection: it finds (almost) nothing."""

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        request = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"
        async with _served() as client_side:
            for n in range(205):
                if n == 5:  # (after a warm-up, from a clean heap)
                    gc.collect()
                    gc.disable()
                await loop.sock_sendall(client_side, request)
                assert (await loop.sock_recv(client_side, 65536)).startswith(b"HTTP/1.1 200")
            return gc.collect()

    try:
        unreachable = asyncio.run(scenario())
    finally:
        gc.enable()
    assert unreachable < 50, f"{unreachable} objects left to the collector by 200 requests"
