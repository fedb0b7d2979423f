"""A small HTTP proxy in front of the moto S3 server that injects storage faults on demand."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


@dataclass
class Fault:
    """Applies to requests matching ``method`` and ``path_contains``, ``times`` times (-1: always).

    ``action``: ``status`` answers with ``status`` and an S3 error body, ``close``
    drops the connection without answering, ``delay`` waits ``seconds`` then forwards.
    ``after`` lets that many matching requests through first.
    """

    action: str
    method: str | None = "PUT"
    path_contains: str = ""
    status: int = 503
    seconds: float = 0.0
    times: int = 1
    after: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in (None, method)) and self.path_contains in path and self.times != 0


class FaultProxy:
    """Forwards to ``upstream`` (http://host:port) except where a fault says otherwise."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._claim(self.command, self.path)
                if fault is not None and fault.action == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.action == "status":
                    payload = f"<Error><Code>Injected{fault.status}</Code></Error>".encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault is not None and fault.action == "delay":
                    time.sleep(fault.seconds)
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_HEADERS | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _claim(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.seen.append((method, path))
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.after > 0:
                        fault.after -= 1
                        return None
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def count(self, method: str, path_contains: str = "") -> int:
        """How many requests of ``method`` whose path contains ``path_contains`` arrived."""
        with self._lock:
            return sum(1 for m, p in self.seen if m == method and path_contains in p)

    def stop(self) -> None:
        """Stop listening: new connections are refused."""
        self._server.shutdown()
        self._server.server_close()
