"""``python -m services.metrics``: ingest + internal query API in one process (the only process that
opens the embedded ClickHouse path). SIGTERM/SIGINT -> uvicorn stops serving, then the lifespan
stops the consumer and closes the ClickHouse client."""

from __future__ import annotations

from services.common.http_server import serve
from services.common.logs import setup_logging
from services.metrics.app import MetricsSettings, create_app


def main() -> None:
    settings = MetricsSettings()
    setup_logging("metrics", settings.log_level)
    serve(create_app(settings), settings.metrics_host, settings.metrics_port)


if __name__ == "__main__":
    main()
