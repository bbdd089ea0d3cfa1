"""A tiny static HTTP server on loopback (stdlib, in a thread) for the ``http_url`` attachment mode.

    with StaticServer({"/a.pdf": b"%PDF..."}) as srv:
        url = srv.url + "/a.pdf"

``fail(path, n, status)`` makes the next ``n`` GETs of ``path`` answer ``status`` (default 503);
``redirect(path, location)`` answers 302 to ``location``; ``hits(path)`` counts the GETs."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StaticServer:
    def __init__(self, files: dict[str, bytes] | None = None, host: str = "127.0.0.1") -> None:
        self.files = dict(files or {})
        self.host = host
        self.port = 0
        self._failures: dict[str, list[int]] = {}
        self._redirects: dict[str, str] = {}
        self._hits: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> StaticServer:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, body, extra = srv._answer(self.path, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/octet-stream" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail(self, path: str, times: int, status: int = 503) -> None:
        with self._lock:
            self._failures.setdefault(path, []).extend([status] * times)

    def redirect(self, path: str, location: str) -> None:
        self._redirects[path] = location

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits[path]

    def _answer(self, path: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            self._hits[path] += 1
            self.headers.append(headers)
            pending = self._failures.get(path)
            if pending:
                return pending.pop(0), b"scripted failure", {}
        if path in self._redirects:
            return 302, b"", {"Location": self._redirects[path]}
        if path in self.files:
            return 200, self.files[path], {}
        return 404, b"not found", {}
