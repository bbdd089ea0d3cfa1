"""``postbus replay analytics|views`` against the real system (broker, services, SMTP sink): a
rebuild verified answer by answer against the answers recorded before it, and the proof that the
verification finds a difference when there is one (an altered answer file, and a real change of the
data after the answers were recorded)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import ADMIN_TOKEN, Tenant, wait_until
from tests.integration.test_cli import cli, json_lines

WINDOW = "8760h"  # the SMTP metrics window of an unbounded replay (replay_analytics.MAX_WINDOW_H)


def verdict(r: Any) -> dict[str, Any]:
    """The JSON line a replay prints last on stdout."""
    return json_lines(r.stdout)[-1]


def send(t: Tenant, *messages: dict[str, Any]) -> None:
    r = t.http.post("/commands/add-messages", json={"messages": list(messages)})
    assert r.status_code == 200 and r.json()["queued"] == len(messages), r.text


def settled(t: Tenant, ids: dict[str, str]) -> list[dict[str, Any]]:
    """Wait until each message has its final status and its report acknowledged (nothing about
    them changes any more while a replay runs); the listing."""

    def listing() -> list[dict[str, Any]] | None:
        r = t.http.get("/messages", params={"tenant_id": t.id})
        if r.status_code != 200:
            return None
        got = {m["id"]: m for m in r.json()["messages"]}
        done = all(mid in got and got[mid]["status"] == status and got[mid]["reported_ts"]
                   for mid, status in ids.items())
        return list(got.values()) if done else None

    return wait_until(listing, timeout=90, interval=0.5, what=f"{sorted(ids)} final and reported")


def test_replay_help(system: LocalSystem) -> None:
    for args in (("replay",), ("replay", "analytics"), ("replay", "views")):
        r = cli(system, *args, "--help")
        assert r.returncode == 0 and "Usage: postbus replay" in r.stdout, (args, r.stderr)
    r = cli(system, "replay", "--help")
    assert "analytics" in r.stdout and "views" in r.stdout
    assert "--from" in cli(system, "replay", "analytics", "--help").stdout
    assert "--against" in cli(system, "replay", "views", "--help").stdout


def test_replay_analytics_verified_and_a_difference_fails(system: LocalSystem, new_tenant, smtp,
                                                          tmp_path: Path) -> None:
    t: Tenant = new_tenant()
    send(t, t.message("ra-1"), t.message("ra-2", to=["reject@example.test"]))
    wait_until(lambda: any(m.subject == "Subject ra-1" for m in smtp.messages), timeout=60, what="ra-1 at the sink")
    settled(t, {"ra-1": "sent", "ra-2": "error"})
    metrics_name = f"metrics {t.id} window={WINDOW}"

    # 1. a replay after real traffic: rebuilt, and every answer the same as before
    saved = tmp_path / "answers.json"
    r = cli(system, "replay", "analytics", "--yes", "--save-answers", str(saved), "--timeout", "240", timeout=400)
    assert r.returncode == 0, r.stderr
    done = verdict(r)
    assert done["ok"] is True and done["differences"] == 0 and done["verified"] > 0
    assert done["events"] > 0 and done["rows"] > 0 and done["rows_before"] > 0
    assert f"verified: {done['verified']} answers identical" in r.stderr and "replay requested" in r.stderr
    assert ADMIN_TOKEN not in r.stdout + r.stderr
    # what was recorded (and verified) are this tenant's real answers
    doc = json.loads(saved.read_text())
    answers = doc["answers"]
    assert doc["projection"] == "analytics" and t.id in doc["params"]["tenants"]
    assert answers[metrics_name]["sent"] == 1 and answers[metrics_name]["errors"] == 1
    assert answers[f"messages {t.id} count"] == 2
    assert answers[f"message {t.id}/ra-1"]["status"] == "sent"
    assert answers[f"message {t.id}/ra-2"]["status"] == "error"
    assert answers[f"bi {t.id} totals"]["sent"] == 1
    assert len(answers) == done["verified"]
    assert "s3cret" not in saved.read_text() and t.api_key not in saved.read_text()

    # 2. the same recorded answers with one deliberately altered: the verification fails on it
    altered = tmp_path / "altered.json"
    bad = json.loads(saved.read_text())
    bad["answers"][metrics_name]["sent"] = 99
    altered.write_text(json.dumps(bad))
    r = cli(system, "replay", "analytics", "--yes", "--against", str(altered), "--timeout", "240", timeout=400)
    assert r.returncode == 1, r.stderr
    out = verdict(r)
    assert out["ok"] is False and out["differences"] == 1 and out["verified"] == done["verified"] - 1
    assert f"differs: {metrics_name}\n  before: {{\"sent\": 99}}\n  after:  {{\"sent\": 1}}" in r.stderr
    assert "1 answer(s) differ" in r.stderr
    # ... and the untouched file still verifies (the difference was the alteration, nothing else)
    r = cli(system, "replay", "analytics", "--yes", "--against", str(saved), "--timeout", "240", timeout=400)
    assert r.returncode == 0, r.stderr
    assert verdict(r)["verified"] == done["verified"]

    # 3. a real change after the answers were recorded: a new message is a difference, by name
    between = time.time()
    wait_until(lambda: time.time() >= between + 0.002, what="the clock past --from (ms resolution)")
    send(t, t.message("ra-3"))
    settled(t, {"ra-3": "sent"})
    r = cli(system, "replay", "analytics", "--yes", "--against", str(saved), "--timeout", "240", timeout=400)
    assert r.returncode == 1, r.stderr
    assert f"differs: message {t.id}/ra-3" in r.stderr and f"differs: messages {t.id} count" in r.stderr
    assert f"differs: {metrics_name}" in r.stderr

    # 4. --from: only the answers about that time on (ra-3, not ra-1/ra-2), verified
    recent = tmp_path / "recent.json"
    r = cli(system, "replay", "analytics", "--yes", "--from", str(between), "--save-answers", str(recent),
            "--timeout", "240", timeout=400)
    assert r.returncode == 0, r.stderr
    assert verdict(r)["ok"] is True and verdict(r)["from"] == int(between * 1000)
    answers = json.loads(recent.read_text())["answers"]
    assert f"message {t.id}/ra-3" in answers and f"message {t.id}/ra-1" not in answers
    assert answers[f"messages {t.id} count"] == 1
    # the SMTP metrics window: whole hours back to --from (here less than one); BI from --from's hour
    assert answers[f"metrics {t.id} window=1h"]["sent"] >= 1 and f"bi {t.id} totals" in answers


def test_replay_views_verified_against_the_api(system: LocalSystem, admin: httpx.Client, new_tenant, smtp,
                                               tmp_path: Path) -> None:
    t: Tenant = new_tenant()
    password = "pw-" + uuid.uuid4().hex
    r = t.http.post("/account", json={"id": "second", "host": smtp.host, "port": smtp.port, "user": "u",
                                       "password": password, "use_tls": False})
    assert r.status_code == 200, r.text
    r = t.http.post(f"/tenant/{t.id}/users", json={"email": f"ops@{t.id}.test", "name": "Ops",
                                                    "password": "correct horse battery " + uuid.uuid4().hex})
    assert r.status_code == 200, r.text
    user_id = r.json()["user"]["id"]

    saved = tmp_path / "views.json"
    r = cli(system, "replay", "views", "--save-answers", str(saved))
    assert r.returncode == 0, r.stderr
    done = verdict(r)
    assert done["ok"] is True and done["differences"] == 0 and done["verified"] > 0
    assert f"verified: {done['verified']} answers identical" in r.stderr
    doc = json.loads(saved.read_text())
    answers = doc["answers"]
    # every view the API holds, with this tenant's records in it, and the admin API's lists
    assert f"postbus.config.tenants {t.id}" in answers and f"postbus.config.accounts {t.id}/second" in answers
    assert f"postbus.config.provider-users {user_id}" in answers
    assert any(k.startswith("postbus.config.apikeys ") for k in answers)
    assert t.id in answers["GET /tenants"] and answers[f"GET /accounts?tenant_id={t.id}"] == ["main", "second"]
    text = saved.read_text() + r.stdout + r.stderr
    assert password not in text and t.api_key not in text and "s3cret" not in text and ADMIN_TOKEN not in text

    # the API's side: digests only (no record, secret or ciphertext), for the admin only
    r = admin.get("/admin/views/digest", params={"salt": "ab" * 16})
    assert r.status_code == 200, r.text
    views = r.json()["views"]
    assert all(set(v) == {"topic", "schema", "applied", "count", "digests"} for v in views)
    assert all(len(d) == 32 and int(d, 16) >= 0 for v in views for d in v["digests"].values())
    assert password not in r.text and "password" not in r.text and t.api_key not in r.text
    r = t.http.get("/admin/views/digest", params={"salt": "ab" * 16})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required" and "digests" not in r.text
    r = admin.get("/admin/views/digest", params={"salt": "ab"})
    assert r.status_code == 422 and r.json()["ok"] is False and r.json()["error"]["code"] == "invalid_salt"

    # a change after the answers were recorded: the verification against them names it
    r = t.http.put(f"/tenant/{t.id}", json={"name": "Renamed " + t.id})
    assert r.status_code == 200, r.text
    r = cli(system, "replay", "views", "--against", str(saved))
    assert r.returncode == 1, r.stderr
    out = verdict(r)
    assert out["ok"] is False and out["differences"] >= 1
    assert f"differs: postbus.config.tenants {t.id}" in r.stderr
    assert password not in r.stdout + r.stderr
    # the API and the log agree again: a fresh verification passes
    r = cli(system, "replay", "views")
    assert r.returncode == 0 and verdict(r)["differences"] == 0, r.stderr

    # --from has no meaning for a compacted topic: a usage error, nothing read
    r = cli(system, "replay", "views", "--from", "2026-11-01T00:00:00Z")
    assert r.returncode == 2 and "state-at" in r.stderr and r.stdout == ""
