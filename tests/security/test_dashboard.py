"""The dashboard page (GET /dashboard) against a tenant that tries to attack the operator's browser.

A tenant chooses strings the admin's dashboard shows: a message's ``batch_code`` is its campaign key
(free text up to 255 characters). Names like ``<img src=x onerror=...>`` must appear on the page as
text, never become markup, never run, never make the browser request anything. Second layer: the
page's Content-Security-Policy refuses inline script and inline event handlers even if markup were
ever injected, while the page's own script (same origin) runs.

Runs in Debian's chromium (tests/support/browser.py) on the session ``system`` (no particular network
policy needed)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import ADMIN_TOKEN, Tenant, wait_until
from tests.support.browser import DashboardPage, chromium

pytestmark = pytest.mark.integration

HOSTILE = [
    '<img src="/dashboard/pwned-img" onerror="window.__pwned=1">',
    '"><script src="/dashboard/pwned-script"></script><b id=pwned>',
    "</td></tr><svg onload=window.__pwned=3>",
]
PLAIN = "spring-sale"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def campaign_keys(system: LocalSystem, token: str) -> set[str]:
    now = int(time.time())
    r = httpx.get(f"{system.url('api')}/api/v1/bi/metrics", headers={"Authorization": f"Bearer {token}"},
                  params={"from_ts": now - 86400, "to_ts": now + 60, "bucket": "hour", "group_by": "campaign"},
                  timeout=60)
    assert r.status_code == 200, r.text
    return {g["key"] for g in r.json()["data"]["groups"]}


def test_tenant_chosen_names_are_shown_as_text_never_run(system: LocalSystem, new_tenant, browser: Any) -> None:
    t: Tenant = new_tenant()
    msgs = [t.message(f"x-{i}-{uuid.uuid4().hex[:6]}", batch_code=code) for i, code in enumerate([PLAIN, *HOSTILE])]
    r = t.http.post("/commands/add-messages", json={"messages": msgs})
    assert r.json()["queued"] == len(msgs), r.text
    wait_until(lambda: {PLAIN, *HOSTILE} <= campaign_keys(system, t.api_key), timeout=120, interval=1.0,
               what="the campaigns counted")

    page = DashboardPage(browser, system)
    try:
        page.open(f"token={ADMIN_TOKEN}&tenant={t.id}")
        rows = page.js("""Array.from(document.querySelectorAll('#table-campaign tbody tr[data-key]'))
                          .map(tr => tr.cells[0].textContent)""")
        # positive control: the plain campaign is listed; the hostile names too, character for character
        assert PLAIN in rows
        for code in HOSTILE:
            assert code in rows, code
        # ... as text: no element came out of them, nothing ran, nothing was fetched
        assert page.js("document.querySelectorAll('main img, main script, main svg, #pwned').length") == 0
        assert page.js("window.__pwned") is None
        assert not [u for u in page.requests if "pwned" in u], page.requests
        assert page.console_errors == []
    finally:
        page.close()


def test_the_csp_refuses_inline_script_even_if_markup_were_injected(system: LocalSystem, browser: Any) -> None:
    page = DashboardPage(browser, system)
    try:
        page.page.goto(f"{page.base}/dashboard")
        # positive control: the page's own script (same origin) runs
        page.page.wait_for_function("document.getElementById('status').textContent.includes('Enter a token')")
        # three attempts a successful injection would make; each must be refused by the CSP, which the
        # browser reports as a securitypolicyviolation event (waited for, not slept on)
        violations = page.js("""new Promise(resolve => {
            const seen = [];
            document.addEventListener('securitypolicyviolation', e => {
                seen.push({directive: e.effectiveDirective, blocked: e.blockedURI});
                if (seen.length === 3) { resolve(seen); }
            });
            const div = document.createElement('div');
            div.innerHTML = '<img src="data:," onload="window.__pwned=1">';  // an inline event handler
            document.body.appendChild(div);
            const s = document.createElement('script');
            s.textContent = 'window.__pwned = 2';  // an inline script
            document.body.appendChild(s);
            const ext = document.createElement('script');
            ext.src = 'https://cdn.example.invalid/x.js';  // a script of another origin
            document.body.appendChild(ext);
            setTimeout(() => resolve(seen), 10000);
        })""")
        directives = sorted(v["directive"] for v in violations)
        assert directives == ["script-src-attr", "script-src-elem", "script-src-elem"], violations
        assert any("example.invalid" in v["blocked"] for v in violations), violations
        assert page.js("window.__pwned") is None
        # the browser refused to send it (a request event fires, then it fails as blocked by the CSP)
        page.page.wait_for_function("true")  # a round trip: earlier events are delivered
        assert not [u for u in page.responses if "example.invalid" in u], page.responses
        assert "csp" in page.failed.get("https://cdn.example.invalid/x.js", "").lower(), page.failed
    finally:
        page.close()
