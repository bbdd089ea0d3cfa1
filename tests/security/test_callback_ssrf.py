"""Finding 2 (reporter SSRF): a tenant aims its delivery reports at the server itself.

The secure system refuses private targets except the operator-listed 127.0.0.2. Each tenant's client
app listens on every loopback address, so one listener is reachable both through the allowed address
(the positive control: reports arrive) and through names that resolve to 127.0.0.1 (the attack: the
reporter must not connect, and the report is kept, not lost)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, internal_headers, wait_until
from tests.security.conftest import ALLOWED_HOST


def _reporter_counter(system: LocalSystem, tenant_id: str, outcome: str) -> float:
    text = httpx.get(system.url("reporter") + "/metrics", headers=internal_headers(system), timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if (line.startswith("postbus_reporter_sync_calls_total{") and f'tenant_id="{tenant_id}"' in line
                and f'outcome="{outcome}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _loopback_name() -> str:
    """A DNS name (not an IP literal, not "localhost") that resolves to loopback only."""
    name = socket.gethostname()
    addrs = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    assert addrs and all(a.startswith("127.") or a == "::1" for a in addrs) and ALLOWED_HOST not in addrs, (
        f"test precondition: {name} should resolve to loopback only, got {addrs}")
    return name


def _queue(t: Tenant, mid: str) -> None:
    r = t.http.post("/commands/add-messages", json={"messages": [t.message(mid)]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text


def test_reports_never_go_to_a_name_resolving_to_loopback(secure_system: LocalSystem,
                                                          secure_tenant: Callable[..., Tenant]) -> None:
    t = secure_tenant()
    # positive control: through the operator-listed address the reports arrive
    _queue(t, "ok-1")
    t.client.wait_for_report(lambda r: r["id"] == "ok-1", timeout=60)
    seen = len(t.client.requests)

    name = _loopback_name()
    r = t.http.put(f"/tenant/{t.id}", json={"client_base_url": f"http://{name}:{t.client.port}"})
    assert r.status_code == 200, r.text  # a DNS name passes the API; the connection is what is checked
    blocked_before = _reporter_counter(secure_system, t.id, "blocked")
    _queue(t, "attack-1")
    wait_until(lambda: _reporter_counter(secure_system, t.id, "blocked") > blocked_before, timeout=60,
               what="the reporter to try the loopback name and be refused")
    assert len(t.client.requests) == seen, "the reporter connected to a loopback address"

    # the refused report was kept: back on the allowed address it is delivered
    r = t.http.put(f"/tenant/{t.id}", json={"client_base_url": f"http://{ALLOWED_HOST}:{t.client.port}"})
    assert r.status_code == 200, r.text
    t.client.wait_for_report(lambda r: r["id"] == "attack-1", timeout=60)


def test_a_redirect_to_loopback_is_not_followed(secure_system: LocalSystem,
                                               secure_tenant: Callable[..., Tenant]) -> None:
    t = secure_tenant()
    _queue(t, "ok-2")
    t.client.wait_for_report(lambda r: r["id"] == "ok-2", timeout=60)  # positive control
    secret_path = "/internal-" + uuid.uuid4().hex
    location = f"http://127.0.0.1:{t.client.port}{secret_path}"
    t.client.script([(307, b"", {"Location": location})] * 3)
    _queue(t, "redir-1")

    def acked_with_redir() -> bool:  # the client records bodies whatever it answered: look for a 200
        return any(q.status == 200 and isinstance(q.json, dict)
                   and any(r.get("id") == "redir-1" for r in q.json.get("delivery_report") or [])
                   for q in t.client.requests)

    wait_until(acked_with_redir, timeout=90, what="the report acknowledged after the scripted redirects")
    assert sum(1 for q in t.client.requests if q.status == 307) == 3  # the redirects were answered
    assert not [q for q in t.client.requests if q.path.startswith(secret_path)], "a redirect was followed"
