"""The internal service credential: one shared secret (``POSTBUS_INTERNAL_TOKEN``) that every
internal port requires and every internal client sends.

- The metrics service (every route but ``GET /health``) and the Prometheus ports of the sender,
  reporter and inbound listener (every path but ``/health``) answer 401 ``internal_auth_required``
  without it.
- It is presented as ``Authorization: Bearer <token>`` (what Prometheus sends with
  ``authorization: {credentials: ...}`` / ``bearer_token``) or ``X-Internal-Token: <token>``, and
  compared in constant time.
- Outside dev mode a service without it refuses to start; in dev mode it is generated once into
  ``<state_dir>/internal.token`` and shared by every local service (the supervisor also passes it
  explicitly in the environment)."""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from services.common.settings import Settings

TOKEN_FILE = "internal.token"
HEADER = "X-Internal-Token"
ERROR_CODE = "internal_auth_required"
ERROR_MESSAGE = "this internal endpoint needs the service credential (Authorization: Bearer or X-Internal-Token)"
MIN_LENGTH = 16
PUBLIC_PATHS = frozenset({"/health"})


class MissingInternalToken(RuntimeError):
    pass


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def dev_token(state_dir: str | os.PathLike[str]) -> str:
    """The dev-mode token of a state dir: created once (atomically: concurrent services starting
    together all read the same complete file), then read."""
    path = Path(state_dir) / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(generate_token())
        try:
            os.link(tmp, path)  # fails if another process won the race: use its token
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path.read_text().strip()


def load_internal_token(settings: Settings) -> str:
    """POSTBUS_INTERNAL_TOKEN; in dev mode only, the generated one of the state dir."""
    token = (settings.internal_token or "").strip()
    if token:
        if len(token) < MIN_LENGTH:
            raise MissingInternalToken(f"POSTBUS_INTERNAL_TOKEN is too short (at least {MIN_LENGTH} characters)")
        return token
    if not settings.dev:
        raise MissingInternalToken(
            "POSTBUS_INTERNAL_TOKEN is not set: every service needs the same internal credential. Generate one "
            "with `python -c 'import secrets; print(secrets.token_urlsafe(32))'` or set POSTBUS_DEV=1 for a "
            "local run."
        )
    return dev_token(settings.state_dir)


def presented_token(headers: Iterable[tuple[str, str]]) -> str | None:
    """The credential of a request, from ``(lower-case name, value)`` pairs: X-Internal-Token, else
    Authorization: Bearer."""
    bearer = None
    for name, value in headers:
        if name == "x-internal-token" and value.strip():
            return value.strip()
        if name == "authorization":
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
    return bearer


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest over UTF-8 bytes); nothing matches an empty
    expected token."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def auth_headers(token: str) -> dict[str, str]:
    """Headers an internal client sends."""
    return {"Authorization": f"Bearer {token}"}


def error_body(message: str = ERROR_MESSAGE) -> bytes:
    return json.dumps({"ok": False, "error": {"code": ERROR_CODE, "message": message}}).encode()


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class InternalAuthMiddleware:
    """ASGI middleware: every HTTP request but ``GET/HEAD /health`` must carry the token. Answers
    before the app runs (no route, no body parsing, no query)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: str,
                 public_paths: frozenset[str] = PUBLIC_PATHS) -> None:
        if not token:
            raise MissingInternalToken("InternalAuthMiddleware needs a token")
        self.app = app
        self.token = token
        self.public_paths = public_paths
        self.refused = 0  # for tests and the log: requests answered 401

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method") in ("GET", "HEAD")
                                       and scope.get("path") in self.public_paths):
            await self.app(scope, receive, send)
            return
        headers = ((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ()))
        if token_matches(presented_token(headers), self.token):
            await self.app(scope, receive, send)
            return
        self.refused += 1
        body = error_body()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="postbus-internal"')]})
        await send({"type": "http.response.body", "body": body})

