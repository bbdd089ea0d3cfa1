"""A real browser for the dashboard tests: Debian's chromium (/usr/bin/chromium, installed by
infra/install.sh; Playwright's own browser download is not used), driven by Playwright."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.supervisor import LocalSystem

CHROMIUM = os.environ.get("POSTBUS_CHROMIUM", "/usr/bin/chromium")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright  # the [test] extra installs it

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run infra/install.sh (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


class DashboardPage:
    """One browser tab on the dashboard, recording every request it makes and its console errors."""

    def __init__(self, browser: Any, system: LocalSystem) -> None:
        self.base = system.url("api")
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.responses: list[str] = []  # requests that got an answer
        self.failed: dict[str, str] = {}  # url -> why the browser did not send it / got no answer
        self.console_errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: self.responses.append(r.url))
        self.page.on("requestfailed", lambda r: self.failed.__setitem__(r.url, r.failure or ""))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)

    def open(self, fragment: str, state: str = "ready") -> None:
        self.page.goto(f"{self.base}/dashboard#{fragment}")
        self.page.wait_for_selector(f'body[data-state="{state}"]', timeout=60_000)

    def text(self, selector: str) -> str:
        return str(self.page.inner_text(selector)).strip()

    def js(self, expr: str) -> Any:
        return self.page.evaluate(expr)

    def close(self) -> None:
        self.context.close()
