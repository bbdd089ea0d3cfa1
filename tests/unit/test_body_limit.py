"""The API's request-body cap (services/api/body_limit.py) as ASGI: over the limit by
Content-Length or by the bytes actually streamed -> 413 ``payload_too_large`` and the application is
never called; within the limit the application gets the body unchanged."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from services.api.body_limit import BodyLimit


class App:
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.calls.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _run(app: BodyLimit, path: str, chunks: list[bytes], content_length: int | None = None
         ) -> tuple[int, dict[str, Any] | None, int]:
    """(status, JSON body or None, chunks the middleware consumed)."""
    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    scope = {"type": "http", "path": path, "method": "POST", "headers": headers}
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    consumed = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal consumed
        if pending:
            consumed += 1
            return pending.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return status, body, consumed


def test_content_length_over_the_limit_is_refused_without_reading() -> None:
    inner = App()
    status, body, consumed = _run(BodyLimit(inner, 1000, 100), "/commands/add-messages", [b"x" * 10], 5000)
    assert status == 413 and body == {"ok": False, "error": {"code": "payload_too_large",
                                                             "message": "the request body is larger than 1000 bytes"}}
    assert consumed == 0 and inner.calls == []


def test_a_streamed_body_over_the_limit_is_refused_once_it_passes_it() -> None:
    inner = App()
    chunks = [b"x" * 400] * 10  # no Content-Length (chunked): 4000 bytes
    status, body, consumed = _run(BodyLimit(inner, 1000, 100), "/commands/add-messages", chunks)
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert consumed == 3 and inner.calls == []  # stopped reading at 1200 bytes


def test_webhook_routes_have_the_small_limit_and_the_smtp_api_its_envelope() -> None:
    inner = App()
    app = BodyLimit(inner, 1000, 100)
    assert _run(app, "/webhooks/ses", [b"x" * 101])[0] == 413
    assert _run(app, "/u/token", [b"x" * 101])[0] == 413
    status, body, _ = _run(app, "/api/v1/anything", [b"x" * 1001])
    assert status == 413 and body["success"] is False and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert inner.calls == []


def test_within_the_limit_the_application_gets_the_body_unchanged() -> None:
    inner = App()
    app = BodyLimit(inner, 1000, 100)
    assert _run(app, "/commands/add-messages", [b"a" * 500, b"b" * 500], 1000)[0] == 200
    assert _run(app, "/webhooks/ses", [b"c" * 100])[0] == 200
    assert _run(app, "/health", [b""])[0] == 200
    assert inner.calls == [b"a" * 500 + b"b" * 500, b"c" * 100, b""]
