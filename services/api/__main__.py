"""``python -m services.api``: the HTTP gateway under uvicorn."""

from __future__ import annotations

import uvicorn

from services.common.logs import setup_logging
from services.common.settings import get_settings


def main() -> None:
    settings = get_settings()
    setup_logging("api", settings.log_level)
    from services.api.app import create_app

    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_config=None, access_log=False, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
