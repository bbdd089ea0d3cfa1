"""``python -m services.reporter``: run the reporter's Faust worker (SIGTERM stops it cleanly)."""

from __future__ import annotations

from services.common.logs import setup_logging
from services.common.settings import get_settings


def main() -> None:
    settings = get_settings()
    setup_logging("reporter", settings.log_level)
    from services.common.faust_support import PromptExitWorker, use_event_loop
    from services.reporter.app import app

    use_event_loop(settings.event_loop)

    # our JSON logging stays in place: the worker must not install its own handlers; a stop that
    # cannot finish (broker down) is cut short after faust_support.STOP_GRACE_S
    worker = PromptExitWorker(
        app, loglevel=settings.log_level, override_logging=False, redirect_stdouts=False, quiet=True
    )
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
