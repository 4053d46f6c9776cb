"""Fixtures for the SDK tests: a scripted real HTTP server and an importable ``lrserve``.

The scripted server is a real ``http.server`` on a loopback port, answering each request
with the next scripted reply (status, headers, body, delay, or a dropped connection). It
exercises the client's real HTTP stack; nothing in httpx is mocked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

CLIENTS_DIR = Path(__file__).resolve().parents[2] / "clients"

try:  # the project installed (pip install -e .) makes this a no-op
    import lrserve  # noqa: F401
except ImportError:
    sys.path.insert(0, str(CLIENTS_DIR))


def sdk_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess that must import ``lrserve`` (and ``service``)."""
    env = dict(os.environ)
    root = str(CLIENTS_DIR.parent)
    parts = [str(CLIENTS_DIR), root, *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("LRSERVE_URL", None)
    env.pop("LRSERVE_TOKEN", None)
    env.update(extra)
    return env


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: Close the connection without answering (after reading the request).
    drop: bool = False
    content_type: str | None = None

    @classmethod
    def problem(
        cls, status: int, slug: str, detail: str, errors: list[Any] | None = None, **headers: str
    ) -> Reply:
        body: dict[str, Any] = {
            "type": f"/problems/{slug}",
            "title": slug.replace("-", " ").capitalize(),
            "status": status,
            "detail": detail,
        }
        if errors is not None:
            body["errors"] = errors
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        return cls(status, body, hdrs, content_type="application/problem+json")


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    at: float


class ScriptedServer:
    """A real HTTP server that plays a script of replies, then repeats the last one."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                with server._lock:
                    server.seen.append(
                        Seen(
                            self.command,
                            url.path,
                            parse_qs(url.query),
                            {k.lower(): v for k, v in self.headers.items()},
                            json.loads(raw) if raw else None,
                            time.monotonic(),
                        )
                    )
                    reply = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(reply.body, (bytes, str)):
                    data = reply.body.encode() if isinstance(reply.body, str) else reply.body
                    ctype = reply.content_type or "text/html"
                elif reply.body is None:
                    data, ctype = b"", reply.content_type
                else:
                    data = json.dumps(reply.body).encode()
                    ctype = reply.content_type or "application/json"
                self.send_response(reply.status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if reply.status not in (204, 304):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if reply.status not in (204, 304):
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def play(self, *replies: Reply) -> ScriptedServer:
        """Replace the script."""
        with self._lock:
            self.script = list(replies)
            self.seen = []
        return self

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    """A scripted HTTP server on a free loopback port."""
    with ScriptedServer() as server:
        yield server


@pytest.fixture
def dead_url() -> str:
    """A loopback URL nothing listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
