"""Run an ASGI app under uvicorn with the project's conventions: our JSON logging, no access log,
graceful shutdown on SIGTERM/SIGINT with exit status 0."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn


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
