"""The ``postbus`` operator CLI (services/cli, docs/cli.md), run as a subprocess against the real
system: admin API for the export and the analytics replay, Kafka directly for the rest."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.supervisor import LocalSystem
from services.common.topics import COMMANDS
from tests.conftest import ADMIN_TOKEN, Tenant, internal_headers, wait_until
from tests.support.smtp_server import RecordingSmtpServer

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def program() -> list[str]:
    """The installed ``postbus`` console script when it runs this tree's code (``make install``
    installs the package editable, so CI's fresh clone has it), else the same entry point through
    ``python -m services.cli``."""
    # the script pip installed for this interpreter (next to it); a PATH lookup may find a wrapper
    # (a pyenv shim is a bash script) instead
    script = Path(sys.executable).parent / "postbus"
    if script.is_file():
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        where = subprocess.run([sys.executable, "-c", "import services.cli as m; print(m.__file__)"], cwd="/",
                               env=env, capture_output=True, text=True, timeout=60).stdout.strip()
        if where and Path(where).resolve().is_relative_to(REPO):
            return [str(script)]
    return [sys.executable, "-m", "services.cli"]


def cli(system: LocalSystem, *args: str, token: str | None = ADMIN_TOKEN, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``postbus ARGS`` with the system's API, admin token and broker in its environment, as an
    operator's shell would have."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBUS_")}
    full_env.update(POSTBUS_API_URL=system.url("api"), POSTBUS_KAFKA_BOOTSTRAP=system.kafka_bootstrap,
                    # no fallback to the tokens of a developer's `make up` in .state
                    POSTBUS_STATE_DIR=str(system.state_dir / "no-cli-state"))
    if token is not None:
        full_env["POSTBUS_ADMIN_TOKEN"] = token
    full_env.update(env or {})
    return subprocess.run([*program(), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def send_and_wait_sent(t: Tenant, smtp: RecordingSmtpServer, mid: str) -> None:
    r = t.http.post("/commands/add-messages", json={"messages": [t.message(mid)]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    wait_until(lambda: any(m.subject == f"Subject {mid}" for m in smtp.messages), timeout=60, what=f"{mid} sent")


def test_help_and_usage_errors(system: LocalSystem) -> None:
    r = cli(system, "--help")
    assert r.returncode == 0
    for cmd in ("export", "tail", "trace", "lag", "topics", "dead-letters", "replay", "state-at"):
        assert cmd in r.stdout
    for args in (("export", "command-log"), ("tail",), ("trace",), ("lag",), ("topics",), ("dead-letters",),
                 ("replay",), ("replay", "analytics"), ("replay", "views"), ("state-at",)):
        h = cli(system, *args, "--help")
        assert h.returncode == 0 and "Usage: postbus" in h.stdout, (args, h.stderr)
    # usage errors: exit code 2 with a clear message
    r = cli(system, "tail", "everything")
    assert r.returncode == 2 and "Invalid value" in r.stderr
    r = cli(system, "state-at", "t1", "yesterday-ish")
    assert r.returncode == 2 and "is not a time" in r.stderr
    r = cli(system, "export", "command-log", token=None)
    assert r.returncode == 2 and "admin token" in r.stderr
    # failures: exit code 1; the token is never echoed, even when the API refuses it
    bad = "wrong-" + uuid.uuid4().hex
    r = cli(system, "export", "command-log", token=bad)
    assert r.returncode == 1 and "401" in r.stderr and bad not in r.stderr + r.stdout
    r = cli(system, "topics", env={"POSTBUS_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert r.returncode == 1 and "did not answer" in r.stderr


def test_export_command_log_redacts_secrets(system: LocalSystem, new_tenant, smtp) -> None:
    t: Tenant = new_tenant()
    password = "pw-" + uuid.uuid4().hex
    r = t.http.post("/account", json={"id": "second", "host": smtp.host, "port": smtp.port, "user": "u",
                                       "password": password, "use_tls": False})
    assert r.status_code == 200, r.text
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("exp-1")]})
    assert r.status_code == 200, r.text

    r = cli(system, "export", "command-log", "--tenant", t.id)
    assert r.returncode == 0, r.stderr
    entries = json_lines(r.stdout)
    assert [e["type"] for e in entries][:3] == ["tenant.create", "account.upsert", "account.upsert"]
    assert all(e["tenant_id"] == t.id for e in entries)
    second = next(e for e in entries if e["type"] == "account.upsert" and e["payload"]["id"] == "second")
    assert second["payload"]["password_enc"] == "***" and second["payload"]["user"] == "u"
    add = next(e for e in entries if e["type"] == "messages.add")
    assert add["payload"]["messages"][0]["id"] == "exp-1" and add["route"] == "POST /commands/add-messages"
    assert password not in r.stdout and t.api_key not in r.stdout and "s3cret" not in r.stdout
    assert f"exported {len(entries)} commands" in r.stderr

    # --since after the tenant's commands: none of them; --type narrows
    later = cli(system, "export", "command-log", "--tenant", t.id, "--since", str(time.time() + 5))
    assert later.returncode == 0 and json_lines(later.stdout) == []
    only = json_lines(cli(system, "export", "command-log", "--tenant", t.id, "--type", "messages.add").stdout)
    assert [e["type"] for e in only] == ["messages.add"]


def test_tail_commands_and_events(system: LocalSystem, new_tenant, smtp) -> None:
    t: Tenant = new_tenant()
    password = "pw-" + uuid.uuid4().hex
    assert t.http.post("/account", json={"id": "pw", "host": smtp.host, "port": smtp.port, "user": "u",
                                          "password": password, "use_tls": False}).status_code == 200
    send_and_wait_sent(t, smtp, "tail-1")

    r = cli(system, "tail", "commands", "--tenant", t.id, "--from-beginning", "--no-follow")
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert recs and all(x["topic"] == COMMANDS and x["key"] == t.id for x in recs)
    types = [x["record"]["type"] for x in recs]
    assert types[:2] == ["tenant.create", "account.upsert"] and "messages.add" in types
    acc = next(x["record"] for x in recs if x["record"]["payload"].get("id") == "pw")
    assert acc["payload"]["password_enc"] == "***" and password not in r.stdout

    # events: the sent event, wait for it on the topic (the mail is at the sink a moment earlier)
    def sent_event() -> dict[str, Any] | None:
        out = cli(system, "tail", "events", "--tenant", t.id, "--from-beginning", "--no-follow")
        assert out.returncode == 0, out.stderr
        return next((x for x in json_lines(out.stdout) if x["record"]["type"] == "sent"), None)

    ev = wait_until(sent_event, timeout=30, interval=1, what="the sent event")
    assert ev["schema"] == "DeliveryEvent" and ev["record"]["message_id"] == "tail-1"
    assert ev["record"]["attempt"] == 1 and ev["record"]["tenant_id"] == t.id and ev["record"]["event_id"]

    # follow mode: started at the end, it prints the next record and stops at --limit
    proc = subprocess.Popen([*program(), "tail", "commands", "--tenant", t.id,
                             "--limit", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("POSTBUS_")},
                                 "POSTBUS_KAFKA_BOOTSTRAP": system.kafka_bootstrap})
    try:
        time.sleep(4)  # the consumer has positioned at the end (a slower start only delays the record below)
        assert proc.poll() is None  # nothing new yet: old records are not printed
        r2 = t.http.post("/commands/add-messages", json={"messages": [t.message("tail-2")]})
        assert r2.status_code == 200
        out, errs = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, errs
    (only,) = json_lines(out)
    assert only["record"]["type"] == "messages.add" and only["record"]["payload"]["messages"][0]["id"] == "tail-2"


def test_trace_timeline(system: LocalSystem, new_tenant, smtp) -> None:
    t: Tenant = new_tenant()
    started = time.time()
    send_and_wait_sent(t, smtp, "tr-1")
    r = t.http.post("/commands/add-messages",
                    json={"messages": [t.message("tr-bad", to=["reject@example.test"])]})
    assert r.status_code == 200
    wait_until(lambda: any(x["id"] == "tr-1" for x in t.client.reports()), timeout=60, what="tr-1 reported")

    def traced() -> dict[str, Any] | None:
        out = cli(system, "trace", t.id, "tr-1", "--json")
        if out.returncode != 0:
            return None
        doc = json.loads(out.stdout)
        return doc if any(i["what"] == "report.acknowledged" for i in doc["timeline"]) else None

    doc = wait_until(traced, timeout=60, interval=1, what="a trace with the report acknowledgement")
    whats = [i["what"] for i in doc["timeline"]]
    assert whats[0] == "messages.add" and "sent" in whats and whats.index("sent") < whats.index("report.acknowledged")
    add = doc["timeline"][0]
    assert add["topic"] == "postbus.commands" and add["offset"] >= 0 and add["route"] == "POST /commands/add-messages"
    assert add["actor"] and add["detail"]["to"] == ["bob@example.test"]
    sent = next(i for i in doc["timeline"] if i["what"] == "sent")
    # the sender's sent event carries the end-of-data reply
    assert sent["detail"]["attempt"] == 1 and sent["detail"]["account_id"] == "main"
    assert sent["detail"]["smtp_code"] == 250
    ack = next(i for i in doc["timeline"] if i["what"] == "report.acknowledged")
    assert sent["detail"]["event_id"] in ack["detail"]["event_ids"]

    # the readable form; the refused message shows its SMTP error
    r = cli(system, "trace", t.id, "tr-1")
    assert r.returncode == 0 and "messages.add" in r.stdout and "smtp_code=250" in r.stdout
    assert "report.acknowledged" in r.stdout and "route='POST /commands/add-messages'" in r.stdout
    bad = wait_until(lambda: (o := cli(system, "trace", t.id, "tr-bad")).returncode == 0
                     and "smtp_code=550" in o.stdout and o, timeout=60, interval=1, what="the 550 error")
    assert "error" in bad.stdout and "no such user" in bad.stdout

    # another tenant's trace of the same id, and an unknown id: nothing, exit 1
    other: Tenant = new_tenant()
    r = cli(system, "trace", other.id, "tr-1")
    assert r.returncode == 1 and "no record of message" in r.stderr
    r = cli(system, "trace", t.id, "never-sent")
    assert r.returncode == 1 and "no record of message" in r.stderr
    # --since bounds the read: from before the message, the same timeline; from after it, nothing
    r = cli(system, "trace", t.id, "tr-1", "--json", "--since", str(started - 1))
    assert r.returncode == 0 and json.loads(r.stdout)["timeline"] == doc["timeline"]
    r = cli(system, "trace", t.id, "tr-1", "--since", str(time.time() + 1))
    assert r.returncode == 1 and "no record of message" in r.stderr


def test_trace_shows_opens_and_clicks(system: LocalSystem, new_tenant, smtp) -> None:
    t: Tenant = new_tenant(tracking={"opens": True, "clicks": True})
    html_body = '<html><body><p>Hi</p><a href="https://example.org/landing">go</a></body></html>'
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("tr-trk", body=html_body, content_type="html", to=["reader@example.test"])]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    mail = wait_until(lambda: next((m for m in smtp.messages if m.message["X-Postbus-Tenant"] == t.id
                                    and m.message["X-Postbus-Message-Id"] == "tr-trk"), None), timeout=60)
    html = mail.message.get_body(("html",)).get_content()
    pixel = re.search(r'src="([^"]+/t/o/[^"]+)"', html).group(1)
    link = re.search(r'href="([^"]+/t/c/[^"]+)"', html).group(1)
    with httpx.Client(timeout=30) as anon:  # the reader's mail client
        assert anon.get(pixel).status_code == 200
        assert anon.get(link, follow_redirects=False).status_code == 302

    def traced() -> dict[str, Any] | None:
        out = cli(system, "trace", t.id, "tr-trk", "--json")
        doc = json.loads(out.stdout) if out.returncode == 0 else None
        whats = [i["what"] for i in doc["timeline"]] if doc else []
        return doc if {"open", "click"} <= set(whats) else None

    doc = wait_until(traced, timeout=60, interval=1, what="the open and click events in the trace")
    whats = [i["what"] for i in doc["timeline"]]
    assert whats[0] == "messages.add" and whats.index("sent") < whats.index("open")
    # the API's tracking commands and the sender's events they became
    assert "tracking.open" in whats and "tracking.click" in whats
    click_ev = next(i for i in doc["timeline"] if i["what"] == "click")
    assert click_ev["detail"]["url"] == "https://example.org/landing"
    assert click_ev["detail"]["recipient"] == "reader@example.test"
    opened = next(i for i in doc["timeline"] if i["what"] == "tracking.open")
    assert opened["route"] and opened["detail"]["source"] == "pixel"


def test_lag_and_topics(system: LocalSystem, new_tenant, smtp) -> None:
    t: Tenant = new_tenant()
    send_and_wait_sent(t, smtp, "lag-1")

    def sender_lag() -> list[dict[str, Any]] | None:
        out = cli(system, "lag", "--json", "--group", "postbus-sender")
        rows = json_lines(out.stdout) if out.returncode == 0 else []
        return [x for x in rows if x["topic"] == COMMANDS] or None

    rows = wait_until(sender_lag, timeout=60, interval=1, what="the sender's committed offsets")
    assert all(x["group"] == "postbus-sender" and x["end"] >= x["committed"] >= 0 for x in rows)
    assert sum(x["end"] for x in rows) > 0
    r = cli(system, "lag")
    assert r.returncode == 0 and "postbus-sender" in r.stdout and "total lag" in r.stdout
    r = cli(system, "lag", "--group", "no-such-group")
    assert r.returncode == 1 and "no committed offsets" in r.stderr

    r = cli(system, "topics", "--json")
    assert r.returncode == 0, r.stderr
    by_name = {x["topic"]: x for x in json_lines(r.stdout)}
    cmd = by_name[COMMANDS]
    parts = int(system.service_env().get("POSTBUS_TOPIC_PARTITIONS", "8"))
    assert cmd["partitions"] == parts and cmd["retention_ms"] == -1 and cmd["cleanup_policy"] == "delete"
    assert sum(cmd["end_offsets"].values()) > 0
    assert by_name["postbus.config.tenants"]["cleanup_policy"] == "compact"
    assert by_name["postbus.deadletter"]["retention_ms"] == 30 * 86400_000
    r = cli(system, "topics")
    assert r.returncode == 0 and "forever" in r.stdout and "compacted" in r.stdout
    r = cli(system, "topics", "--topic", "postbus.nope")
    assert r.returncode == 1 and "does not exist" in r.stderr


async def _produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> int:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        return (await p.send_and_wait(topic, value=value, key=key)).offset
    finally:
        await p.stop()


async def _read_at(bootstrap: str, tp: TopicPartition, offset: int) -> Any:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        c.assign([tp])
        c.seek(tp, offset)
        return await asyncio.wait_for(c.getone(), 30)
    finally:
        await c.stop()


def test_dead_letters_list_and_replay(system: LocalSystem) -> None:
    key = ("dl" + uuid.uuid4().hex[:10]).encode()
    poison = b"\x00not an avro command " + key
    offset = asyncio.run(_produce(system.kafka_bootstrap, COMMANDS, key, poison))

    def listed(source_offset: int) -> list[dict[str, Any]] | None:
        out = cli(system, "dead-letters", "--json", "--topic", COMMANDS)
        assert out.returncode == 0, out.stderr
        return [x for x in json_lines(out.stdout) if x["key"] == key.decode() and x["source_offset"] == source_offset
                ] or None

    rows = wait_until(lambda: listed(offset), timeout=60, interval=1, what="the poison command dead-lettered")
    assert all(x["source_topic"] == COMMANDS and x["reason"] and x["consumer"] for x in rows)
    assert rows[0]["value_schema"] is None and rows[0]["value_bytes"] == len(poison)
    text = cli(system, "dead-letters", "--topic", COMMANDS)
    assert text.returncode == 0 and f"{COMMANDS}[" in text.stdout and "reason=" in text.stdout

    # --replay without --yes (no terminal to ask): refused, nothing re-appended
    r = cli(system, "dead-letters", "--offset", str(rows[0]["offset"]), "--replay")
    assert r.returncode == 2 and "--yes" in r.stderr
    r = cli(system, "dead-letters", "--offset", str(rows[0]["offset"]), "--replay", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    (replayed,) = [x["replayed"] for x in json_lines(r.stdout) if "replayed" in x]
    assert replayed["topic"] == COMMANDS and replayed["offset"] > offset
    rec = asyncio.run(_read_at(system.kafka_bootstrap, TopicPartition(COMMANDS, replayed["partition"]),
                               replayed["offset"]))
    assert rec.key == key and rec.value == poison  # the very same record, re-appended
    # the consumers saw it again (and, still poison, dead-lettered it again)
    wait_until(lambda: listed(replayed["offset"]), timeout=60, interval=1, what="the replayed record consumed")


def test_state_at_before_and_after_suspend(system: LocalSystem, new_tenant, smtp) -> None:
    t: Tenant = new_tenant()
    password = "pw-" + uuid.uuid4().hex
    # a second account with a password (the fixture's "main", without one, sends the mail)
    assert t.http.post("/account", json={"id": "second", "host": smtp.host, "port": smtp.port, "user": "u",
                                          "password": password, "use_tls": False}).status_code == 200
    time.sleep(0.05)
    before = time.time()
    time.sleep(0.05)
    r = t.http.post("/commands/suspend")
    assert r.status_code == 200 and r.json()["suspended_all"] is True, r.text
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("held-1"), t.message("held-2")]})
    assert r.status_code == 200, r.text
    time.sleep(0.05)
    during = time.time()
    time.sleep(0.05)

    r = cli(system, "state-at", t.id, str(before), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["exists"] is True and s["tenant"]["id"] == t.id
    assert s["suspension"]["suspended"] is False and s["queue"]["message_ids"] == []
    main, second = s["accounts"]
    assert main["id"] == "main" and main["password_enc"] is None and main["port"] == smtp.port
    assert second["id"] == "second" and second["user"] == "u" and second["password_enc"] == "***"
    assert password not in r.stdout and "s3cret" not in r.stdout
    assert s["tenant"]["client_auth_secret_enc"] == "***"

    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(during)) + f".{int(during * 1000) % 1000:03d}Z"
    r = cli(system, "state-at", t.id, iso, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["suspension"]["suspended"] is True and s["suspension"]["all"] is True
    assert s["queue"]["message_ids"] == ["held-1", "held-2"]
    text = cli(system, "state-at", t.id, iso)
    assert text.returncode == 0 and "suspended: all batches" in text.stdout and "held-1" in text.stdout

    # released and sent: now nothing is suspended or queued
    assert t.http.post("/commands/activate").status_code == 200
    wait_until(lambda: sum(m.subject in ("Subject held-1", "Subject held-2") for m in smtp.messages) == 2,
               timeout=60, what="the held messages sent")

    def now_state() -> dict[str, Any] | None:
        out = cli(system, "state-at", t.id, str(time.time()), "--json")
        st = json.loads(out.stdout) if out.returncode == 0 else None
        return st if st and st["queue"]["message_ids"] == [] else None

    s = wait_until(now_state, timeout=30, interval=1, what="the sent events on the topic")
    assert s["suspension"]["suspended"] is False

    # before the tenant existed: nothing
    r = cli(system, "state-at", t.id, "2020-01-01T00:00:00Z", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["exists"] is False


def test_replay_analytics(system: LocalSystem, new_tenant, smtp) -> None:
    t: Tenant = new_tenant()
    send_and_wait_sent(t, smtp, "rp-1")

    def sent_count() -> int:
        r = t.http.get(f"/api/v1/tenants/{t.id}/smtp/metrics", params={"window": "24h"})
        return r.json()["data"]["sent"] if r.status_code == 200 else -1

    wait_until(lambda: sent_count() == 1, timeout=60, interval=0.5, what="the send counted before the replay")
    r = cli(system, "replay", "analytics")
    assert r.returncode == 2 and "--yes" in r.stderr  # no terminal to ask: refused
    token = internal_headers(system)["Authorization"].split(" ", 1)[1]
    r = cli(system, "replay", "analytics", "--yes", "--timeout", "240",
            env={"POSTBUS_METRICS_URL": system.url("metrics"), "POSTBUS_INTERNAL_TOKEN": token}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "replay requested" in r.stderr and token not in r.stdout + r.stderr
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert done["ok"] is True and done["events"] > 0 and done["rows"] > 0 and done["rows_before"] > 0
    assert done["differences"] == 0 and f"verified: {done['verified']} answers identical" in r.stderr
    # rebuilt from the topics: the tenant's send is counted again, once
    assert sent_count() == 1
