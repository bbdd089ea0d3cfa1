"""Issue 9 §3, the tenant SMTP API tells the truth, read at once after the write that changed it:
``sending_enabled`` follows the instance switch, the tenant's ``active`` flag and its suspensions;
``enforcement.throttled`` says when part of the mail is held (suspended batch, rate limit);
``reputation_band`` reads ``suspended`` while sending is suspended; ``delivered`` leaves out
messages that bounced later."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.integration.test_bounces import _deliver, _dsn, _sent_headers
from tests.support.smtp_server import RecordingSmtpServer


def _get(t: Tenant, what: str) -> dict[str, Any]:
    r = t.http.get(f"/api/v1/tenants/{t.id}/smtp/{what}", params={"window": "24h"} if what == "metrics" else None,
                   headers={"Authorization": f"Bearer {t.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]


@pytest.fixture
def instance_restored(admin: httpx.Client) -> Iterator[None]:
    yield
    assert admin.put("/instance", json={"active": True}).status_code == 200


def test_sending_enabled_and_band_follow_every_switch(new_tenant, admin: httpx.Client, instance_restored) -> None:
    t: Tenant = new_tenant()
    s = _get(t, "status")
    assert s["sending_enabled"] is True and s["enforcement"]["throttled"] is False  # control
    assert s["reputation_band"] != "suspended"

    switches = [
        (lambda: t.http.post("/commands/suspend"), lambda: t.http.post("/commands/activate")),
        (lambda: admin.put(f"/tenant/{t.id}", json={"active": False}),
         lambda: admin.put(f"/tenant/{t.id}", json={"active": True})),
        (lambda: admin.put("/instance", json={"active": False}), lambda: admin.put("/instance", json={"active": True})),
    ]
    for off, on in switches:
        assert off().status_code == 200
        s = _get(t, "status")
        assert s["sending_enabled"] is False and s["reputation_band"] == "suspended", s
        assert s["enforcement"]["throttled"] is True and s["enforcement"]["notes"]
        assert _get(t, "metrics")["reputation_band"] == "suspended"
        assert on().status_code == 200
        s = _get(t, "status")
        assert s["sending_enabled"] is True and s["reputation_band"] != "suspended", s


def test_a_suspended_batch_is_throttled_not_disabled(new_tenant) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/suspend", params={"batch_code": "promo"}).status_code == 200
    s = _get(t, "status")
    assert s["sending_enabled"] is True and s["enforcement"]["throttled"] is True
    assert "promo" in s["enforcement"]["notes"]
    assert t.http.post("/commands/activate", params={"batch_code": "promo"}).status_code == 200
    assert _get(t, "status")["enforcement"]["throttled"] is False


def test_a_rate_limit_in_force_reads_throttled(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/account", json={"id": "slow", "host": smtp.host, "port": smtp.port, "use_tls": False,
                                      "limit_per_minute": 1})
    assert r.status_code == 200, r.text
    assert _get(t, "status")["enforcement"]["throttled"] is False  # control: nothing held yet
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message(f"rl-{i}", account_id="slow") for i in range(3)]})
    assert r.status_code == 200 and r.json()["queued"] == 3, r.text
    s = wait_until(lambda: (s := _get(t, "status"))["enforcement"]["throttled"] and s, timeout=30,
                   what="the rate limit to hold the 2nd and 3rd message")
    assert s["sending_enabled"] is True and "rate limit" in s["enforcement"]["notes"]


def test_delivered_leaves_out_messages_bounced_later(system: LocalSystem, new_tenant,
                                                     smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("ok-1"), t.message("gone-1", to=["gone@example.test"])]})
    assert r.status_code == 200 and r.json()["queued"] == 2
    wait_until(lambda: _get(t, "metrics")["sent"] == 2, what="both sent")
    assert _get(t, "metrics")["delivered"] == 2  # control: both count as delivered until one bounces
    headers = _sent_headers(smtp, t.id, "gone-1")
    _deliver(system, _dsn(headers, "gone@example.test", "5.1.1", "550 5.1.1 user unknown"))
    m = wait_until(lambda: (m := _get(t, "metrics"))["bounced"] == 1 and m, what="the hard bounce counted")
    assert m["sent"] == 2 and m["delivered"] == 1


def test_default_from_is_set_on_the_tenant_and_returned(new_tenant) -> None:
    t: Tenant = new_tenant()
    assert _get(t, "config")["default_from"] is None  # control: nothing set yet
    r = t.http.put(f"/tenant/{t.id}", json={"default_from": {"name": "ACME Mail", "email": "no-reply@acme.test"}})
    assert r.status_code == 200, r.text
    assert _get(t, "config")["default_from"] == {"name": "ACME Mail", "email": "no-reply@acme.test"}
    assert t.http.get(f"/tenant/{t.id}").json()["default_from"] == {"name": "ACME Mail",
                                                                    "email": "no-reply@acme.test"}
    r = t.http.put(f"/tenant/{t.id}", json={"default_from": {"email": "not an address"}})
    assert r.status_code == 422
    assert t.http.put(f"/tenant/{t.id}", json={"default_from": None}).status_code == 200
    assert _get(t, "config")["default_from"] is None


def test_a_failed_dkim_check_reads_failed() -> None:
    from services.api.routes_smtp import _DKIM_STATUS

    assert _DKIM_STATUS["Failed"] == "failed" and _DKIM_STATUS["Success"] == "verified"
