"""A cap on request bodies, enforced before anything parses them (and before authentication).

A pure ASGI middleware, outermost in the API: a request whose ``Content-Length`` is over the limit
is answered 413 ``payload_too_large`` without reading its body; any other request's body is read
and counted chunk by chunk (chunked transfer encoding included) and answered 413 the moment it
passes the limit, so no route ever holds more than the limit in memory. The body read within the
limit is handed to the application unchanged.

Limits (settings): ``api_max_body_bytes`` for every route, ``api_max_webhook_body_bytes`` for the
public POST routes that take no credential (``/webhooks/...`` and the one-click unsubscribe
``/u/...``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SMALL_BODY_PREFIXES = ("/webhooks/", "/u/")
SMTP_API_PREFIX = "/api/v1/"  # the tenant SMTP surface answers in its own envelope (errors.py)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, small_max_bytes: int,
                 small_prefixes: tuple[str, ...] = SMALL_BODY_PREFIXES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.small_max_bytes = small_max_bytes
        self.small_prefixes = small_prefixes

    def limit_for(self, path: str) -> int:
        return self.small_max_bytes if path.startswith(self.small_prefixes) else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limit_for(path)
        length = _content_length(scope)
        if length is not None and length > limit:
            await _too_large(send, path, limit)
            return
        # read the whole body within the limit before the application sees the request
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, path, limit)
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect notice, as the server sends it

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


async def _too_large(send: Send, path: str, limit: int) -> None:
    message = f"the request body is larger than {limit} bytes"
    if path.startswith(SMTP_API_PREFIX):
        body: dict[str, Any] = {"success": False, "error": {"code": "PAYLOAD_TOO_LARGE", "message": message}}
    else:
        body = {"ok": False, "error": {"code": "payload_too_large", "message": message}}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
