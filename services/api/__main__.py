"""``python -m services.api``: the HTTP gateway under uvicorn."""

from __future__ import annotations

from services.common.http_server import serve
from services.common.logs import setup_logging
from services.common.settings import get_settings


def main() -> None:
    settings = get_settings()
    setup_logging("api", settings.log_level)
    from services.api.app import create_app

    serve(create_app(settings), settings.api_host, settings.api_port)


if __name__ == "__main__":
    main()
