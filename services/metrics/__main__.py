"""``python -m services.metrics``: ingest + internal query API in one process (the only process that
opens the embedded ClickHouse path). SIGTERM/SIGINT -> uvicorn stops serving, then the lifespan
stops the consumer and closes the ClickHouse client."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from services.common.logs import setup_logging
from services.metrics.app import MetricsSettings, create_app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal once shut down (exit status -15); a clean stop exits 0 instead
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def main() -> None:
    settings = MetricsSettings()
    setup_logging("metrics", settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.metrics_host,
        port=settings.metrics_port,
        log_config=None,  # keep our JSON handler on the root logger
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    _Server(config).run()


if __name__ == "__main__":
    main()
