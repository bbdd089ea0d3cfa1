"""Two sender instances running together (Faust splits the tenants' partitions between them):
600 messages over 11 tenants are each delivered exactly once, and one account's per-minute limit
holds across both instances.

Its own system (with a 20 s "minute", ``sender_rate_minute_s``, testing only) plus a second sender
process with its own metrics port and state folder."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import internal_headers, wait_until
from tests.support.client_app import ClientApp
from tests.support.prometheus import prom, sender_idle
from tests.support.smtp_server import RecordingSmtpServer
from tests.support.two_senders import SecondSender, system_with_two_senders

ADMIN = "two-senders-" + uuid.uuid4().hex
MINUTE_S = 20


@pytest.fixture(scope="module")
def smtp() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer() as s:
        yield s


@pytest.fixture(scope="module")
def two_senders() -> Iterator[tuple[LocalSystem, SecondSender]]:
    with system_with_two_senders("two-senders", ADMIN, {
            "POSTBUS_SENDER_RATE_MINUTE_S": str(MINUTE_S), "POSTBUS_SENDER_MX_LOOKUP": "0",
            "POSTBUS_REPORTER_FLUSH_MS": "200"}) as both:  # loopback client apps and SMTP server: allowed
        yield both


def test_two_senders_never_double_send_and_share_one_rate_limit(two_senders, smtp: RecordingSmtpServer) -> None:
    system, second = two_senders
    clients: list[ClientApp] = []
    tenants: list[tuple[str, httpx.Client]] = []
    try:
        with httpx.Client(base_url=system.url("api"), headers={"X-API-Token": ADMIN}, timeout=30) as admin:
            for i in range(11):
                client = ClientApp(token="tok").start()
                clients.append(client)
                tid = f"two{i}-{uuid.uuid4().hex[:6]}"
                r = admin.post("/tenant", json={"id": tid, "client_base_url": client.url,
                                                "client_auth": {"method": "bearer", "token": "tok"}})
                assert r.status_code == 200, r.text
                http = httpx.Client(base_url=system.url("api"), headers={"X-API-Token": r.json()["api_key"]},
                                    timeout=30)
                limit = {"limit_per_minute": 50} if i == 10 else {}
                r = http.post("/account", json={"id": "main", "host": smtp.host, "port": smtp.port,
                                                "use_tls": False, **limit})
                assert r.status_code == 200, r.text
                tenants.append((tid, http))
        # start right after a window boundary so the limited burst begins in a fresh window
        time.sleep(MINUTE_S - time.time() % MINUTE_S + 0.5)
        for tid, http in tenants:
            msgs = [{"id": f"m{j}", "tenant_id": tid, "account_id": "main", "from": f"app@{tid}.test",
                     "to": [f"rcpt{j % 7}@example.test"], "subject": f"two {j}", "body": "x"} for j in range(50)]
            if tid == tenants[10][0]:
                msgs += [{**m, "id": f"m{j + 50}"} for j, m in enumerate(msgs)]  # 100 for the limited one
            r = http.post("/commands/add-messages", json={"messages": msgs})
            assert r.status_code == 200 and r.json()["queued"] == len(msgs), r.text

        def delivered() -> Counter[tuple[str, str]]:
            return Counter((m.message["X-Postbus-Tenant"], m.message["X-Postbus-Message-Id"]) for m in smtp.messages)

        wait_until(lambda: len(delivered()) >= 600, timeout=120, interval=1, what="600 distinct messages")
        # evidence that nothing more is coming: neither instance has anything pending or in flight, and
        # every send they counted has arrived (a double send counts twice: sum 601, an arrival 601)
        headers = internal_headers(system)
        urls = (system.url("sender"), second.url)

        def sent() -> float:
            return sum(prom(u, headers, "gmp_sent_total") for u in urls)

        wait_until(lambda: all(sender_idle(u, headers) for u in urls) and sent() >= 600, timeout=60,
                   what="both senders idle with every send counted")
        got = delivered()
        assert len(got) == 600 and max(got.values()) == 1, [k for k, n in got.items() if n > 1][:10]
        assert sent() == len(smtp.messages) == 600, (sent(), len(smtp.messages))

        limited = tenants[10][0]
        windows = Counter(int(m.received_at // MINUTE_S) for m in smtp.messages
                          if m.message["X-Postbus-Tenant"] == limited)
        assert sum(windows.values()) == 100
        assert max(windows.values()) == 50 and all(n <= 50 for n in windows.values()), windows

        # both instances did part of the work
        first, other = prom(urls[0], headers, "gmp_sent_total"), prom(urls[1], headers, "gmp_sent_total")
        assert first + other >= 600 and first > 0 and other > 0, (first, other)
    finally:
        for c in clients:
            c.stop()
        for _, http in tenants:
            http.close()
