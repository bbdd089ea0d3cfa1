"""The dashboard page (GET /dashboard, docs/dashboard.md) in a real browser: Debian's chromium
(/usr/bin/chromium, installed by infra/install.sh) driven by Playwright, against the real system.

Real messages are sent for two tenants; the page, opened with a token in the URL fragment, must show
exactly what GET /api/v1/bi/metrics answers for the same query (the page exposes the query it made
and its Chart.js objects as ``window.postbusDashboard``): the totals and rates in its text, the
volume chart's points, the provider and domain charts, the reputation and campaign tables. The admin
and a bi:read principal see every tenant, a principal without bi:read gets "Not allowed", a tenant key
sees its own tenant only; a wrong token shows an error and no numbers. The admin run's screenshot is saved as
tests/artifacts/dashboard.png."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import ADMIN_TOKEN, BI_TOKEN, SUPPORT_TOKEN, Tenant, wait_until
from tests.support.browser import DashboardPage as Page
from tests.support.browser import chromium

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
COUNTS = ("sent", "delivered", "bounced", "complained", "opened", "clicked", "deferred", "errors")
RATES = ("delivery_rate", "bounce_rate", "complaint_rate", "open_rate", "click_rate")
DISTINCT_COUNTS = ("messages_sent", "messages_delivered", "messages_bounced", "messages_complained",
                   "unique_opens", "unique_clicks")
DISTINCT_RATES = ("message_delivery_rate", "message_bounce_rate", "message_complaint_rate", "unique_open_rate",
                  "unique_click_rate")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def bi(system: LocalSystem, token: str, query: dict[str, Any], group_by: str | None = None,
       status: int = 200) -> dict[str, Any]:
    params = {"from_ts": query["from_ts"], "to_ts": query["to_ts"], "bucket": query["bucket"]}
    if group_by:  # as the page asks: the grouped panels show event counts only
        params |= {"group_by": group_by, "top": 10, "distinct": "false"}
    if query.get("tenant_id"):
        params["tenant_id"] = query["tenant_id"]
    r = httpx.get(f"{system.url('api')}/api/v1/bi/metrics", params=params,
                  headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == status, r.text
    body = r.json()
    if status != 200:
        return body
    assert body["success"] is True
    return body["data"]  # type: ignore[no-any-return]


def fmt_rate(r: float) -> str:
    """As the page's ``(r * 100).toFixed(2)``: JavaScript rounds an exact tie up (0.125 -> "0.13"),
    Python's format rounds it to even ("0.12"); the exact binary value rounded half up is the same."""
    return f"{Decimal(r * 100).quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)}%"


def label(key: Any) -> str:
    """How the page names a group: its key, "(none)" for the empty key (e.g. mail of no campaign)."""
    return str(key) if str(key) else "(none)"


def send_and_wait(t: Tenant, system: LocalSystem, n_ok: int, n_rejected: int) -> None:
    msgs = [t.message(f"d-{i}", to=[f"user{i}@{('gmail.test', 'example.test')[i % 2]}"]) for i in range(n_ok)]
    msgs += [t.message(f"d-bad-{i}", to=["reject@example.test"]) for i in range(n_rejected)]
    r = t.http.post("/commands/add-messages", json={"messages": msgs})
    assert r.json()["queued"] == n_ok + n_rejected, r.text

    def counted() -> bool:
        now = int(time.time())
        q = {"from_ts": now - 86400, "to_ts": now + 60, "bucket": "day"}
        tot = bi(system, t.api_key, q)["totals"]
        return tot["sent"] == n_ok and tot["errors"] == n_rejected

    wait_until(counted, timeout=120, interval=1.0, what=f"{t.id}'s mail counted by the BI API")


def assert_page_matches_api(page: Page, system: LocalSystem, token: str) -> dict[str, Any]:
    """Every number the page shows equals the API's answer to the query the page made."""
    query = page.js("window.postbusDashboard.query")
    base = bi(system, token, query)
    # the page's own copy of the answer is the API's
    assert page.js("window.postbusDashboard.responses.totals") == base
    for k in COUNTS:
        assert page.text(f"#total-{k}") == str(base["totals"][k]), k
    for k in RATES:
        assert page.text(f"#rate-{k}") == fmt_rate(base["totals"][k]), k
    # the distinct-message figures of the same answer (docs/bi.md), next to the event counts
    for k in DISTINCT_COUNTS:
        assert page.text(f"#total-{k}") == str(base["totals"][k]), k
    for k in DISTINCT_RATES:
        assert page.text(f"#rate-{k}") == fmt_rate(base["totals"][k]), k

    # volume over time: one point per bucket of the API's series, per dataset
    volume = page.js("""(() => { const c = window.postbusDashboard.charts['chart-volume'];
        return {labels: c.data.labels, sets: Object.fromEntries(c.data.datasets.map(d => [d.label, d.data])),
                drawn: c.getDatasetMeta(0).data.length}; })()""")
    assert len(volume["labels"]) == len(base["series"]) == volume["drawn"] > 0
    for k in ("sent", "delivered", "bounced"):
        assert volume["sets"][k] == [p[k] for p in base["series"]], k
    assert sum(volume["sets"]["sent"]) == base["totals"]["sent"]

    groups = {g: bi(system, token, query, g)["groups"] for g in ("tenant", "domain", "provider", "campaign")}
    for chart_id, g in (("chart-providers", "provider"), ("chart-domains", "domain")):
        data = page.js(f"""(() => {{ const c = window.postbusDashboard.charts['{chart_id}'];
            return {{labels: c.data.labels, sent: c.data.datasets.find(d => d.label === 'sent').data}}; }})()""")
        assert data["labels"] == [label(x["key"]) for x in groups[g]], g
        assert data["sent"] == [x["sent"] for x in groups[g]], g
    for table in ("tenant", "domain", "campaign"):
        keys = page.js(f"""Array.from(document.querySelectorAll('#table-{table} tbody tr[data-key]'))
                           .map(tr => tr.dataset.key)""")
        assert keys == [str(x["key"]) for x in groups[table]], table
    for table in ("tenant", "domain"):  # the reputation tables: sent, rates and band per row
        rows = page.js(f"""Array.from(document.querySelectorAll('#table-{table} tbody tr[data-key]'))
                           .map(tr => Array.from(tr.cells).map(td => td.textContent.trim()))""")
        assert rows == [[label(g["key"]), str(g["sent"]), fmt_rate(g["delivery_rate"]), fmt_rate(g["bounce_rate"]),
                         fmt_rate(g["complaint_rate"]), g["reputation_band"].replace("_", " ")]
                        for g in groups[table]], table
    campaigns = page.js("""Array.from(document.querySelectorAll('#table-campaign tbody tr[data-key]'))
                           .map(tr => Array.from(tr.cells).map(td => td.textContent.trim()))""")
    assert campaigns == [[label(g["key"]), *(str(g[k]) for k in ("sent", "delivered", "bounced", "opened", "clicked")),
                          fmt_rate(g["delivered"] / g["sent"] if g["sent"] else 0)] for g in groups["campaign"]]
    return {"query": query, "base": base, "groups": groups}


def test_dashboard_renders_the_api_numbers_for_admin_tenant_and_wrong_token(
        system: LocalSystem, admin: httpx.Client, new_tenant, browser: Any) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    send_and_wait(a, system, n_ok=5, n_rejected=1)
    send_and_wait(b, system, n_ok=3, n_rejected=0)

    # --- the admin token, given in the URL fragment: every tenant -------------------------------
    page = Page(browser, system)
    try:
        page.open(f"token={ADMIN_TOKEN}&window=86400&bucket=hour")
        got = assert_page_matches_api(page, system, ADMIN_TOKEN)
        tenant_rows = {str(g["key"]): g for g in got["groups"]["tenant"]}
        assert tenant_rows[a.id]["sent"] == 5 and tenant_rows[a.id]["errors"] == 1
        assert tenant_rows[b.id]["sent"] == 3
        assert got["base"]["totals"]["sent"] >= 8
        assert got["groups"]["provider"], "no provider groups"
        # the token left the address bar at once, stays in this tab's sessionStorage only
        assert "token" not in page.js("window.location.href")
        assert page.js("sessionStorage.getItem('postbus.dashboard.token')") == ADMIN_TOKEN
        assert page.js("localStorage.length") == 0
        assert page.js("document.cookie") == ""
        # no external request, no CSP violation, no script error
        assert page.requests and all(u.startswith(page.base + "/") for u in page.requests), page.requests
        assert all(u.startswith(page.base + "/dashboard") or u.startswith(page.base + "/api/v1/bi/metrics?")
                   for u in page.requests), page.requests
        assert not any(ADMIN_TOKEN in u for u in page.requests)
        assert page.console_errors == []
        ARTIFACTS.mkdir(exist_ok=True)
        page.page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    finally:
        page.close()

    # --- a support principal with bi:read: every tenant; one without it: "Not allowed" -------------
    page = Page(browser, system)
    try:
        page.open(f"token={BI_TOKEN}&window=86400&bucket=hour")
        got = assert_page_matches_api(page, system, BI_TOKEN)
        assert {a.id, b.id} <= {str(g["key"]) for g in got["groups"]["tenant"]}
        page.page.fill("#token", SUPPORT_TOKEN)  # scopes smtp:read + tenant:read, no bi:read
        page.page.click("#load")
        page.page.wait_for_selector('body[data-state="error"]', timeout=60_000)
        assert "Not allowed" in page.text("#error")
        assert page.js("window.postbusDashboard.responses.totals") is None
        # nothing of the previous token's answer stays on screen
        assert page.text("#total-sent") == "\u2013"
        assert page.text("#total-messages_sent") == "\u2013"
        assert page.js("Object.keys(window.postbusDashboard.charts).length") == 0
        assert page.js("document.querySelectorAll('tbody tr').length") == 0
        bi(system, SUPPORT_TOKEN, got["query"], status=403)
    finally:
        page.close()

    # --- a tenant key: its own tenant only --------------------------------------------------------
    page = Page(browser, system)
    try:
        page.open(f"token={a.api_key}&window=86400&bucket=day")
        got = assert_page_matches_api(page, system, a.api_key)
        assert [g["key"] for g in got["groups"]["tenant"]] == [a.id]
        assert got["base"]["totals"]["sent"] == 5 and got["base"]["totals"]["errors"] == 1
        assert page.text("#total-sent") == "5"
        assert page.text("#total-messages_sent") == "5" and page.text("#rate-message_delivery_rate") == "100.00%"
        # the grouped panels asked for event counts only (the cheaper query)
        assert all("distinct=false" in u for u in page.requests if "group_by=" in u)
        assert any("group_by=" in u for u in page.requests)
        assert b.id not in page.text("main")
        # naming another tenant: the API's 403 shown as an error, no numbers
        page.page.fill("#tenant", b.id)
        page.page.click("#load")
        page.page.wait_for_selector('body[data-state="error"]', timeout=60_000)
        assert "Not allowed" in page.text("#error")
        assert page.js("window.postbusDashboard.responses.totals") is None
        assert page.js("window.postbusDashboard.error").startswith("Not allowed")
        assert page.text("#total-sent") == "\u2013"
        assert a.id not in page.text("main")
        bi(system, a.api_key, {**got["query"], "tenant_id": b.id}, status=403)
    finally:
        page.close()

    # --- a wrong token: an error message, nothing shown, the token forgotten ----------------------
    page = Page(browser, system)
    try:
        page.open("token=not-a-valid-token", state="error")
        assert page.page.is_visible("#error")
        assert "token was not accepted" in page.text("#error")
        assert page.text("#total-sent") == "\u2013"  # the placeholder: no number
        assert page.js("window.postbusDashboard.charts['chart-volume']") is None
        assert page.js("sessionStorage.getItem('postbus.dashboard.token')") is None
        # the same page with a valid token typed in the form works (positive control in this tab)
        page.page.fill("#token", a.api_key)
        page.page.click("#load")
        page.page.wait_for_selector('body[data-state="ready"]', timeout=60_000)
        assert page.text("#total-sent") == "5"
    finally:
        page.close()


def test_dashboard_page_headers_and_assets(system: LocalSystem) -> None:
    base = system.url("api")
    r = httpx.get(f"{base}/dashboard", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text  # no inline script (the CSP would refuse it anyway)
    for name in ("dashboard.js", "dashboard.css", "chart.umd.min.js", "chart.js.LICENSE.md"):
        a = httpx.get(f"{base}/dashboard/{name}", timeout=30)
        assert a.status_code == 200, name
        assert a.headers["content-security-policy"] == csp
    # nothing else of the package is reachable through the asset route
    for path in ("/dashboard/routes_dashboard.py", "/dashboard/..%2Froutes_dashboard.py",
                 "/dashboard/%2E%2E%2F%2E%2E%2Fapp.py", "/dashboard/index.html.bak"):
        assert httpx.get(base + path, timeout=30).status_code == 404, path
