"""Priorities over HTTP: labels and default_priority as stored, and priority 0 overtaking older mail."""

from __future__ import annotations

from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import RecordingSmtpServer

CONNECTIONS_PER_ACCOUNT = 8


def _listed(t: Tenant) -> dict[str, dict]:
    r = t.http.get("/messages")
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["messages"]}


def test_labels_numbers_and_default_priority_are_normalised(new_tenant) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/suspend").status_code == 200  # keep them pending while we look
    r = t.http.post("/commands/add-messages", json={"default_priority": "low", "messages": [
        t.message("p-immediate", priority="immediate"), t.message("p-high", priority="high"),
        t.message("p-medium", priority="medium"), t.message("p-7", priority=7), t.message("p-neg", priority=-2),
        t.message("p-junk", priority="whenever"), t.message("p-default"),
    ]})
    assert r.status_code == 200 and r.json()["queued"] == 7
    listed = wait_until(lambda: len(m := _listed(t)) == 7 and m, what="the 7 messages listed")
    assert {k: v["priority"] for k, v in listed.items()} == {
        "p-immediate": 0, "p-high": 1, "p-medium": 2, "p-7": 3, "p-neg": 0, "p-junk": 3, "p-default": 3}
    assert t.http.post("/commands/activate").status_code == 200


def test_priority_zero_overtakes_older_lower_priority_mail(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/suspend").status_code == 200
    older = [t.message(f"old-{i}", subject=f"old-{i}", priority="low") for i in range(40)]
    assert t.http.post("/commands/add-messages", json={"messages": older}).json()["queued"] == 40
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("urgent", subject="urgent",
                                                                             priority=0)]})
    assert r.json()["queued"] == 1
    wait_until(lambda: len(_listed(t)) == 41, what="all 41 held messages known")
    assert t.http.post("/commands/activate").status_code == 200

    def arrivals() -> list[str]:
        return [m.message["Subject"] for m in smtp.messages if m.message["X-Postbus-Tenant"] == t.id]

    order = wait_until(lambda: len(a := arrivals()) == 41 and a, timeout=60, what="all 41 delivered")
    # FIFO alone would deliver it last; with parallel connections it must be in the first wave
    assert order.index("urgent") < CONNECTIONS_PER_ACCOUNT, order
    assert sorted(s for s in order if s != "urgent") == sorted(f"old-{i}" for i in range(40))
