"""Issue 8: an SMTP account's host is tenant input, so it is under the one network policy.

Against ``secure_system`` (production policy, only 127.0.0.2 allowed): the API refuses a literal
non-public host with 422 ``host_not_allowed``; a name the API cannot judge (it resolves to loopback)
or a short numeric form is refused by the sender when it resolves it, so the message fails with a
policy error and the SMTP server, listening on every address, receives nothing. Control: the same
server through the allowed address 127.0.0.2 gets the mail."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from tests.conftest import Tenant, wait_until
from tests.security.conftest import ALLOWED_HOST
from tests.support.smtp_server import RecordingSmtpServer

LITERAL_HOSTS = ["127.0.0.1", "::1", "[::1]", "localhost", "LOCALHOST.", "mail.localhost", "::ffff:127.0.0.1",
                 "[::ffff:7f00:1]", "2130706433", "0x7f000001", "0.0.0.0", "10.0.0.5", "169.254.169.254",
                 "fe80::1", "100.64.0.1"]


def _final(t: Tenant, mid: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(lambda: next((r for r in t.client.reports_for(mid) if "sent_ts" in r or "error_ts" in r),
                                   None), timeout, what=f"{mid} final report")


def test_the_api_refuses_a_literal_non_public_smtp_host(secure_tenant) -> None:
    t: Tenant = secure_tenant()
    # control: the operator-listed address is accepted
    r = t.http.post("/account", json={"id": "allowed", "host": ALLOWED_HOST, "port": 2525, "use_tls": False})
    assert r.status_code == 200, r.text
    for host in LITERAL_HOSTS:
        r = t.http.post("/account", json={"id": "evil", "host": host, "port": 25, "use_tls": False})
        assert r.status_code == 422, (host, r.text)
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and err["message"].startswith("host "), (host, err)
    ids = {a["id"] for a in t.http.get("/accounts").json()["accounts"]}
    assert "allowed" in ids and "evil" not in ids


def test_a_host_name_resolving_to_loopback_fails_the_message_and_nothing_is_sent(secure_tenant) -> None:
    name = socket.gethostname()
    resolved = {info[4][0] for info in socket.getaddrinfo(name, 25, type=socket.SOCK_STREAM)}
    assert resolved and not any(ipaddress.ip_address(a).is_global or a == ALLOWED_HOST for a in resolved), \
        f"this test needs a host name that resolves to non-public addresses only; {name} -> {resolved}"
    with RecordingSmtpServer(host="0.0.0.0") as srv:  # reachable as 127.0.0.1, 127.0.0.2, the host's IPs
        t: Tenant = secure_tenant()
        accounts = {"good": ALLOWED_HOST, "byname": name, "short": "127.1"}  # 127.1 = 127.0.0.1 to the resolver
        for aid, host in accounts.items():
            r = t.http.post("/account", json={"id": aid, "host": host, "port": srv.port, "use_tls": False})
            assert r.status_code == 200, (host, r.text)  # nothing the API can tell from the text

        # control: through the allowed address the same server gets the mail
        r = t.http.post("/commands/add-messages", json={"messages": [
            t.message("good", account_id="good", to=["good@example.test"])]})
        assert r.status_code == 200 and r.json()["queued"] == 1, r.text
        assert "sent_ts" in _final(t, "good")
        srv.wait_for(1, timeout=30)

        r = t.http.post("/commands/add-messages", json={"messages": [
            t.message("byname", account_id="byname", to=["byname@example.test"]),
            t.message("short", account_id="short", to=["short@example.test"])]})
        assert r.status_code == 200 and r.json()["queued"] == 2, r.text
        for mid in ("byname", "short"):
            final = _final(t, mid)
            assert "error_ts" in final and "network policy" in final["error"], final
            assert "non-public address" in final["error"], final
            assert not [x for x in t.client.reports_for(mid) if "deferred_ts" in x]  # permanent, not retried
        assert [a.rcpt for a in srv.rcpt_attempts] == ["good@example.test"]
        assert len(srv.messages) == 1
