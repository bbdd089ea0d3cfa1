"""The tenant's application, as a real HTTP server on loopback (stdlib, in a thread).

    with ClientApp(token="s3cret") as app:
        tenant = {"client_base_url": app.url, "client_auth": {"method": "bearer", "token": "s3cret"}}
        ...
        app.wait_for_reports(lambda reports: any(r["id"] == "m1" and "sent_ts" in r for r in reports))

It records every POST (any path) with its headers and JSON body, checks the credentials (bearer
``token`` and/or ``basic=(user, password)``; 401 otherwise; none configured = no check) and answers
the configured JSON (default ``{"ok": true, "queued": 0}``) with the configured status. Scripted
answers (``script([...])``) are used first, one per authorized POST, then the default again.
``files`` serves attachments for the ``endpoint`` fetch mode: a POST ``{"storage_path": p}`` to
``attachments_path`` answers the bytes of ``files[p]`` (404 when unknown).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Answer = tuple[int, Any] | tuple[int, Any, dict[str, str]]  # (status, JSON body or bytes[, extra headers])


@dataclass
class ReceivedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any
    authorized: bool
    status: int  # what we answered
    received_at: float = field(default_factory=time.time)

    @property
    def delivery_report(self) -> list[dict]:
        if isinstance(self.json, dict) and isinstance(self.json.get("delivery_report"), list):
            return self.json["delivery_report"]
        return []


class ClientApp:
    def __init__(
        self,
        token: str | None = "s3cret",
        *,
        basic: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        response: Any = None,
        status: int = 200,
        sync_path: str = "/mail-proxy/sync",
        attachments_path: str = "/attachments",
        files: dict[str, bytes] | None = None,
    ) -> None:
        self.token = token
        self.basic = basic
        self.host = host
        self.port = port
        self.response = {"ok": True, "queued": 0} if response is None else response
        self.status = status
        self.sync_path = sync_path
        self.attachments_path = attachments_path
        self.files = dict(files or {})
        self.responder: Callable[[ReceivedRequest], Answer | None] | None = None
        self._script: list[Answer] = []
        self._requests: list[ReceivedRequest] = []
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> ClientApp:
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                app._handle(self)

            def do_PUT(self) -> None:
                app._handle(self)

            def do_GET(self) -> None:
                app._handle(self)

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="client-app", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ClientApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL: the tenant's ``client_base_url``."""
        return f"http://{self.host}:{self.port}"

    @property
    def sync_url(self) -> str:
        return self.url + self.sync_path

    # ---------------------------------------------------------------- configuration
    def set_response(self, response: Any = None, status: int | None = None) -> None:
        """The default answer from now on (JSON-able body, or bytes)."""
        if response is not None:
            self.response = response
        if status is not None:
            self.status = status

    def script(self, answers: Iterable[Answer]) -> None:
        """Answers for the next authorized requests, in order: ``[(500, {"error": "x"}), (200, {...})]``."""
        with self._cond:
            self._script.extend(answers)

    # ---------------------------------------------------------------- serving
    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.token is None and self.basic is None:
            return True
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if self.token is not None and scheme.lower() == "bearer" and value.strip() == self.token:
            return True
        if self.basic is not None and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except Exception:
                return False
            return (user, password) == self.basic
        return False

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in h.headers.items()}
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        split = urlsplit(h.path)
        req = ReceivedRequest(
            method=h.command,
            path=split.path,
            query=parse_qs(split.query),
            headers=headers,
            body=body,
            json=parsed,
            authorized=self._authorized(headers),
            status=0,
        )
        extra: dict[str, str] = {}
        if not req.authorized:
            status, payload = 401, {"error": "unauthorized"}
        else:
            answer = self._answer(req)
            status, payload = answer[0], answer[1]
            extra = answer[2] if len(answer) > 2 else {}  # type: ignore[misc]
        req.status = status
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        ctype = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, req: ReceivedRequest) -> Answer:
        if req.path == self.attachments_path and self.files:
            path = req.json.get("storage_path") if isinstance(req.json, dict) else None
            if path in self.files:
                return 200, self.files[path]
            return 404, {"error": "not found"}
        with self._cond:
            if self._script:
                return self._script.pop(0)
        if self.responder is not None:
            answer = self.responder(req)
            if answer is not None:
                return answer
        return self.status, self.response

    # ---------------------------------------------------------------- records
    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received (authorized or not), in order (a copy)."""
        with self._cond:
            return list(self._requests)

    def sync_calls(self) -> list[ReceivedRequest]:
        """Authorized POSTs to the sync path."""
        return [r for r in self.requests if r.authorized and r.method == "POST" and r.path == self.sync_path]

    def reports(self) -> list[dict]:
        """Every delivery_report item of every authorized POST, flattened, in arrival order."""
        with self._cond:
            return [item for r in self._requests if r.authorized for item in r.delivery_report]

    def reports_for(self, message_id: str) -> list[dict]:
        return [r for r in self.reports() if r.get("id") == message_id]

    def reset(self) -> None:
        with self._cond:
            self._requests.clear()
            self._script.clear()

    def wait_for_requests(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedRequest]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"expected {count} request(s) within {timeout}s, got {len(self._requests)}")
                self._cond.wait(left)
            return list(self._requests)

    def wait_for_reports(self, until: int | Callable[[list[dict]], Any] = 1, timeout: float = 30.0) -> list[dict]:
        """Block until ``until`` report items arrived (int), or until ``until(reports)`` is truthy
        (callable over the flattened list). Returns all reports. TimeoutError otherwise."""
        if isinstance(until, int):
            n = until

            def done(reports: list[dict]) -> bool:
                return len(reports) >= n
        else:
            done = until
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                reports = [item for r in self._requests if r.authorized for item in r.delivery_report]
                if done(reports):
                    return reports
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"reports not as expected within {timeout}s: {len(reports)} report(s) in "
                        f"{len(self._requests)} request(s); last: {reports[-3:]}"
                    )
                self._cond.wait(left)

    def wait_for_report(self, predicate: Callable[[dict], Any], timeout: float = 30.0) -> dict:
        """Block until one report item matches ``predicate``; returns it."""
        reports = self.wait_for_reports(lambda rs: any(predicate(r) for r in rs), timeout)
        return next(r for r in reports if predicate(r))
