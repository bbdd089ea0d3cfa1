"""Run an ASGI app under uvicorn with the project's conventions: our JSON logging, no access log,
graceful shutdown on SIGTERM/SIGINT with exit status 0. And the Prometheus/liveness port of the
sender, reporter and inbound listener (``start_metrics_server``): ``GET /health`` is public, every
other path (``/metrics``) needs the internal service credential (common/internal_auth.py)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import uvicorn
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from services.common.internal_auth import error_body, load_internal_token, presented_token, token_matches
from services.common.settings import Settings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal once shut down (exit status -15); a clean stop exits 0 instead
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def serve(app: Any, host: str, port: int) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep our JSON handler on the root logger
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    _Server(config).run()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log
        pass


# readiness of this process ("recovered and consuming", not "process answers"): set by the service
# once its tables are recovered and its consumers run; /ready answers 503 until then
_readiness: Callable[[], bool] = lambda: True  # noqa: E731


def set_readiness(check: Callable[[], bool]) -> None:
    global _readiness
    _readiness = check


def metrics_wsgi_app(token: str, registry: CollectorRegistry = REGISTRY) -> Callable[..., Iterable[bytes]]:
    """``/health`` (alive) and ``/ready`` (recovered and consuming) -> for anyone; anything else ->
    the Prometheus exposition with the token, 401 ``internal_auth_required`` without it."""
    prometheus = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path in ("/health", "/ready") and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            ok = path == "/health" or _readiness()
            body = b'{"ok": true}' if ok else b'{"ok": false, "error": {"code": "not_ready", "message": "recovering"}}'
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        headers = [("x-internal-token", environ.get("HTTP_X_INTERNAL_TOKEN", "")),
                   ("authorization", environ.get("HTTP_AUTHORIZATION", ""))]
        if not token_matches(presented_token(headers), token):
            body = error_body()
            start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body))),
                                                ("WWW-Authenticate", 'Bearer realm="postbus-internal"')])
            return [body]
        return prometheus(environ, start_response)  # type: ignore[no-any-return]

    return app


def start_metrics_server(settings: Settings, port: int, host: str | None = None,
                         registry: CollectorRegistry = REGISTRY) -> WSGIServer:
    """Serve ``metrics_wsgi_app`` on ``host`` (default: setting ``prometheus_host``, 127.0.0.1) in a
    daemon thread. Raises MissingInternalToken outside dev mode without POSTBUS_INTERNAL_TOKEN (the
    service refuses to start) and OSError when the port is taken."""
    token = load_internal_token(settings)
    server = make_server(host or settings.prometheus_host, port, metrics_wsgi_app(token, registry),
                         _ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
