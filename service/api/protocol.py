"""uvicorn's HTTP protocol with a request-head timeout, a connection cap and direct answers.

uvicorn times out idle keep-alive connections only (``timeout_keep_alive``, armed after a
response). A connection that sends nothing, or half a request head, is held forever, and
every one holds a file descriptor: 300 of them on a 256-descriptor limit made every new
connection fail (``accept`` got ``EMFILE``). This protocol adds:

- **a head timeout** (``LRSERVE_HEADER_TIMEOUT``, default 10 s): from the moment a connection
  opens, or the first byte of its next request arrives, the request head (request line and
  headers) must be complete within that time, or the connection is closed (with a 408
  problem when part of a head had arrived);
- **a body timeout** (``LRSERVE_BODY_TIMEOUT``, default 30 s): once the head is in, the rest
  of the body must arrive within that time, or the request is answered 408 and closed.
- **a connection cap** (``LRSERVE_MAX_CONNECTIONS``; 0, the default, means three quarters
  of the process's soft ``RLIMIT_NOFILE``, the rest left for the database, threads and
  logs): a connection that would go over the cap closes the oldest connection still waiting
  for a request head (silent, half-sent or idle keep-alive), so an open request or a
  held ``?wait=`` report is never dropped for it; when every connection is busy with a
  request, the new one is answered 503 and closed instead.

Two changes to how answers are written, for the moment a completed step answers a thousand
waiting ranks at once: a response of known length goes out in one write, not two
(``_CycleWrites``), and the app may write a whole JSON answer itself, past the ASGI
stack (``ANSWER_NOW``).

``lrserve serve`` selects it with uvicorn's ``http=`` option (an import string, so every
worker process loads it); the limits come from the ``LRSERVE_*`` environment that
``serve_main`` hands to the workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import weakref
from dataclasses import dataclass
from functools import cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

log = logging.getLogger("lrserve.http")

PROTOCOL = "service.api.protocol:GuardedHttpToolsProtocol"
"""What ``serve_main`` passes as uvicorn's ``http`` option."""


@dataclass(frozen=True)
class Limits:
    """The connection limits of one server process."""

    header_timeout: float
    body_timeout: float
    max_connections: int


def connection_cap(configured: int, soft_nofile: int | None = None) -> int:
    """``configured`` when positive, else three quarters of the soft descriptor limit (at
    least 16): the remaining quarter (at least 64) is for everything else the process opens."""
    if configured > 0:
        return configured
    if soft_nofile is None:
        soft_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_nofile == resource.RLIM_INFINITY or soft_nofile <= 0:
        soft_nofile = 65_536
    return max(16, soft_nofile - max(64, soft_nofile // 4))


@cache
def limits() -> Limits:
    """This process's limits, read once from the ``LRSERVE_*`` environment."""
    settings = Settings.from_env()
    return Limits(
        settings.header_timeout, settings.body_timeout, connection_cap(settings.max_connections)
    )


def _raw_problem(status: int, reason: str, slug: str, detail: str, retry_after: int = 0) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 problem+json answer, for the protocol to
    write itself (no request reached the app)."""
    body = json.dumps(
        {"type": f"/problems/{slug}", "title": reason, "status": status, "detail": detail}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        + (f"retry-after: {retry_after}\r\n" if retry_after else "")
        + "connection: close\r\n\r\n"
    )
    return head.encode() + body


_HEAD_408 = _raw_problem(
    408, "Request Timeout", "request-timeout", "the request head did not arrive in time"
)
_BODY_408 = _raw_problem(
    408, "Request Timeout", "request-timeout", "the request body did not arrive in time"
)
_FULL_503 = _raw_problem(
    503,
    "Service Unavailable",
    "service-unavailable",
    "the server is at its connection limit; retry shortly",
    retry_after=1,
)


class _Waiting:
    """The connections of one server that wait for a request head, oldest first."""

    def __init__(self) -> None:
        self.connections: dict[GuardedHttpToolsProtocol, None] = {}

    def add(self, connection: GuardedHttpToolsProtocol) -> None:
        self.connections.pop(connection, None)
        self.connections[connection] = None  # (re)inserted last: the newest

    def discard(self, connection: GuardedHttpToolsProtocol) -> None:
        self.connections.pop(connection, None)

    def oldest_other(self, connection: GuardedHttpToolsProtocol) -> GuardedHttpToolsProtocol | None:
        for candidate in self.connections:
            if candidate is not connection:
                return candidate
        return None


def _waiting(server_state: Any) -> _Waiting:
    registry: _Waiting | None = getattr(server_state, "lrserve_waiting", None)
    if registry is None:
        registry = _Waiting()
        server_state.lrserve_waiting = registry
    return registry


ANSWER_NOW = "lrserve.answer_now"
"""Scope key of ``answer_now(body: bytes) -> bool`` (set by this protocol on every request):
it writes a complete ``200 application/json`` answer with ``body`` at once, past the ASGI
stack, and says whether it did (not once a response started, or the client went away). The
app must then send nothing for the request; the ``ANSWERED`` key tells the middleware."""

ANSWERED = "lrserve.answered"
"""Scope key set to the status of an answer ``answer_now`` wrote."""

DISCONNECTED = "lrserve.disconnected"
"""Scope key of ``disconnected() -> bool`` (set by this protocol on every request): whether
the client went away before the request was answered. Starlette's ``is_disconnected`` asks
the same of uvicorn through a cancelled ``receive``, which costs about 50 times more (anyio
formats the task's repr for each cancellation): a thousand waiting ranks asking four times a
second took half a core."""

_OK_LINE = b"HTTP/1.1 200 OK\r\n"


class _CycleWrites:
    """The transport as one request's response cycle sees it, and the request's
    ``answer_now``.

    - A response of known length goes out in one write (head and body together) instead of
      uvicorn's two. Each write is a ``send`` system call that wakes the peer; when a
      completed step wakes a thousand waiting ranks, the second call per answer was about a
      tenth of the fan-out's time. The head is held only when uvicorn has it ready with a
      ``Content-Length`` and a body to follow; anything else (a ``100 Continue``, a chunked
      or streamed answer, HEAD, an empty body) is written at once, and so is a held head
      when the connection closes.
    - :meth:`answer_now` and :meth:`disconnected` (see ``ANSWER_NOW``, ``DISCONNECTED``).

    The cycle is held weakly: it holds this object (as its transport, and in its scope), and
    a cycle of references per request would leave every request's objects to the cyclic
    collector instead of freeing them as the request ends.
    """

    __slots__ = ("_cycle", "_head", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = weakref.ref(cycle)
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
            return
        cycle = self._cycle()
        if (
            cycle is not None
            and cycle.response_started
            and not cycle.response_complete
            and cycle.chunked_encoding is False
            and cycle.expected_content_length > 0
            and cycle.scope["method"] != "HEAD"
        ):
            self._head = data  # the head: its body's write sends both
            return
        self._transport.write(data)

    def close(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head)
        self._transport.close()

    def answer_now(self, body: bytes) -> bool:
        """Write ``body`` as the request's whole answer, as uvicorn's ``send`` would have
        for a ``JsonBytesResponse`` (same head, the server's default headers first), and
        complete the request's cycle the way it does (keep-alive or close, then the next
        pipelined request).

        When a step's completion answers a thousand waiting ranks, each answer's task
        resuming through the middleware, the routes and uvicorn's ``send`` costs more than
        its ``write``: written from one loop (see ``Runs.report``'s ``deliver``), the
        answers go out in about half the time.
        """
        cycle = self._cycle()
        if (
            cycle is None
            or cycle.response_started
            or cycle.disconnected
            or self._transport.is_closing()
        ):
            return False
        parts = [_OK_LINE]
        for name, value in cycle.default_headers:
            parts += [name.lower(), b": ", value, b"\r\n"]
        parts.append(b"content-length: %d\r\ncontent-type: application/json\r\n" % len(body))
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += [b"\r\n", body]
        cycle.response_started = True
        cycle.chunked_encoding = False
        cycle.expected_content_length = 0
        cycle.response_complete = True
        self._transport.write(b"".join(parts))
        cycle.scope[ANSWERED] = 200
        cycle.message_event.set()
        if not cycle.keep_alive:
            self._transport.close()
        cycle.on_response()
        return True

    def disconnected(self) -> bool:
        """See ``DISCONNECTED``."""
        cycle = self._cycle()
        return cycle is None or bool(cycle.disconnected)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head timeout and a connection cap (see
    the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits()
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # part of a head arrived (a timeout then answers 408)
        self._in_head = True  # between requests or inside a head (not in a request)

    # -- connection life ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        waiting = _waiting(self.server_state)
        if len(self.connections) > self._limits.max_connections:
            victim = waiting.oldest_other(self)
            if victim is None:
                # Every other connection carries a request: refuse this one, keep theirs.
                log.warning("connection limit reached: refusing a connection")
                self._in_head = False
                transport.write(_FULL_503)
                transport.close()
                return
            victim.shed()
        waiting.add(self)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        _waiting(self.server_state).discard(self)
        super().connection_lost(exc)

    def shed(self) -> None:
        """Close this waiting connection to make room for a new one."""
        self._cancel_head_timer()
        _waiting(self.server_state).discard(self)
        if not self.transport.is_closing():
            self.transport.close()

    # -- the head timeout -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes = True
            # The first bytes after an idle keep-alive arm the timer, unless they end the head
            # (nearly every request: its head comes in one read), which would cancel it at
            # once; a timer armed and cancelled per request cost about 10% of GET throughput.
            if self._head_timer is None and b"\r\n\r\n" not in data:
                self._arm_head_timer()
        super().data_received(data)
        cycle = self.cycle
        if (
            self._body_timer is None
            and not self._in_head
            and cycle is not None
            and cycle.more_body
            and not cycle.response_complete
        ):
            # A head whose body did not come with it (a small body nearly always does).
            self._body_timer = self.loop.call_later(self._limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        if self._in_head:
            # The rest of a body the app answered without reading: no new head yet, so the
            # connection is idle again (and the bytes seen were not a head's).
            self._head_bytes = False
            self._arm_head_timer()
        super().on_message_complete()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = False
        self._cancel_head_timer()
        _waiting(self.server_state).discard(self)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            writes = _CycleWrites(self.transport, cycle)
            cycle.transport = writes  # type: ignore[assignment]
            cycle.scope[ANSWER_NOW] = writes.answer_now  # type: ignore[literal-required]
            cycle.scope[DISCONNECTED] = writes.disconnected  # type: ignore[literal-required]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            # Idle keep-alive: uvicorn's keep-alive timer runs; the next byte re-arms ours.
            self._in_head = True
            _waiting(self.server_state).add(self)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        _waiting(self.server_state).discard(self)
        if self.transport.is_closing():
            return
        if self._head_bytes:
            self.transport.write(_HEAD_408)
        self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app is still waiting for the body (nothing else can answer meanwhile).
            self.transport.write(_BODY_408)
        self.transport.close()
