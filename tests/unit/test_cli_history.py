"""The CLI's rebuilds from decoded records: one message's timeline (trace), a tenant's state at a
time (state-at), and the time arguments."""

from __future__ import annotations

from types import SimpleNamespace

import click
import pytest

from services.cli import history
from services.cli.context import parse_time
from services.cli.kafka import command_entry, partition_for, record_json
from services.common.avro import codec

T = "acme"


def cmd(ctype: str, payload: dict, offset: int, ts: int, tenant: str | None = T) -> dict:
    return {"command_id": f"c{offset}", "ts": ts, "type": ctype, "tenant_id": tenant, "actor": f"tenant:{T}",
            "route": "POST /x", "payload_schema": "X", "payload": history.redact(payload), "partition": 3,
            "offset": offset, "_payload": payload}


def rec(topic: str, offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, partition=3, offset=offset)


def msg(mid: str, **kw) -> dict:
    return {"id": mid, "pk": "pk-" + mid, "tenant_id": T, "account_id": "main", "from_addr": "a@x", "to": ["b@y"],
            "subject": "s", "attachments": [{"filename": "f", "auth": {"method": "bearer", "secret_enc": "xx"}}],
            **kw}


def test_trace_collects_command_events_report_and_engagement_in_time_order() -> None:
    items = []
    items += history.command_items(cmd("messages.add", {"messages": [msg("m0"), msg("m1")]}, 10, 1000), T, "m1")
    items += history.command_items(cmd("messages.add", {"messages": [msg("m1")]}, 11, 1500, tenant="other"), T, "m1")
    ev = {"event_id": "e1", "type": "deferred", "tenant_id": T, "message_id": "m1", "ts": 2000, "attempt": 1,
          "smtp_code": 451, "error": "try later", "deferred_until": 5000}
    items.append(history.event_item(ev, rec("postbus.events", 20), T, "m1"))
    ev2 = {**ev, "event_id": "e2", "type": "sent", "ts": 6000, "attempt": 2, "smtp_code": None, "error": None,
           "deferred_until": None}
    items.append(history.event_item(ev2, rec("postbus.events", 21), T, "m1"))
    assert history.event_item({**ev2, "message_id": "m0"}, rec("postbus.events", 22), T, "m1") is None
    items += history.report_items({"tenant_id": T, "event_ids": ["e0", "e2"], "message_ids": ["m0", "m1"], "ts": 7000},
                                  rec("postbus.reports", 5), T, "m1")
    items += history.command_items(cmd("tracking.open", {"kind": "open", "tenant_id": T, "message_id": "m1",
                                                         "source": "pixel", "ts": 8000}, 30, 8000), T, "m1")
    items += history.command_items(cmd("messages.delete", {"tenant_id": T, "ids": ["m2"]}, 31, 9000), T, "m1")
    tl = history.sort_timeline(items)
    assert [i["what"] for i in tl] == ["messages.add", "deferred", "sent", "report.acknowledged", "tracking.open"]
    add = tl[0]
    assert add["offset"] == 10 and add["index"] == 1 and add["detail"]["to"] == ["b@y"]
    assert tl[3]["detail"]["event_ids"] == ["e2"]
    text = "\n".join(history.render_timeline(T, "m1", tl))
    assert "smtp_code=451" in text and "accepted=2xx" in text and "attempt=2" in text
    assert "xx" not in str(tl)  # the attachment credential never shown


def test_state_folds_config_suspension_and_queue() -> None:
    s = history.TenantState(T)
    s.apply_command(cmd("tenant.create", {"id": T, "name": "Acme", "active": True,
                                          "client_auth_secret_enc": "cipher"}, 1, 100))
    s.apply_command(cmd("account.upsert", {"id": "main", "tenant_id": T, "host": "h", "port": 25,
                                           "password_enc": "cipher"}, 2, 110))
    s.apply_command(cmd("account.upsert", {"id": "old", "tenant_id": T, "host": "h", "port": 25}, 3, 120))
    s.apply_command(cmd("account.delete", {"tenant_id": T, "account_id": "old"}, 4, 130))
    s.apply_command(cmd("messages.suspend", {"tenant_id": T, "all": False, "batches": ["b1"], "updated_ts": 140},
                        5, 140))
    s.apply_command(cmd("messages.add", {"messages": [msg("a"), msg("b"), msg("c"), msg("d")]}, 6, 150))
    s.apply_event({"tenant_id": T, "message_id": "a", "type": "sent", "ts": 160})
    s.apply_event({"tenant_id": T, "message_id": "b", "type": "deferred", "ts": 160})
    s.apply_event({"tenant_id": "other", "message_id": "c", "type": "sent", "ts": 160})
    s.apply_command(cmd("messages.delete", {"tenant_id": T, "ids": ["d"]}, 7, 170))
    s.apply_command(cmd("tenant.update", {"id": "zzz"}, 8, 180, tenant="other"))
    out = s.to_json(200)
    assert out["exists"] and out["tenant"]["name"] == "Acme" and out["tenant"]["client_auth_secret_enc"] == "***"
    assert [a["id"] for a in out["accounts"]] == ["main"] and out["accounts"][0]["password_enc"] == "***"
    assert out["suspension"] == {"suspended": True, "all": False, "batches": ["b1"],
                                 "updated_at": history.iso(140)}
    assert out["queue"] == {"pending": 2, "message_ids": ["b", "c"]}
    assert "cipher" not in str(out)
    text = "\n".join(history.render_state(out))
    assert "suspended: batches b1" in text and "queue: 2 pending: b, c" in text

    # config topics fill only what the commands never told; tenant.delete clears everything
    s.apply_config("account", f"{T}/main", {"id": "main", "host": "other"})
    s.apply_config("account", f"{T}/extra", {"id": "extra", "host": "h2"})
    assert s.accounts["main"]["host"] == "h" and s.accounts["extra"]["host"] == "h2"
    s.apply_command(cmd("tenant.delete", {"tenant_id": T}, 9, 190))
    gone = s.to_json(200)
    assert not gone["exists"] and gone["accounts"] == [] and gone["queue"]["pending"] == 0
    s.apply_config("tenant", T, {"id": T})  # a compacted leftover does not resurrect a deleted tenant
    assert s.to_json(200)["exists"] is False


def test_parse_time_forms() -> None:
    assert parse_time("1700000000", "--since") == 1_700_000_000_000
    assert parse_time("1700000000123", "--since") == 1_700_000_000_123
    assert parse_time("2026-11-28T10:00:00Z", "T") == parse_time("2026-11-28T11:00:00+01:00", "T")
    assert parse_time("2026-11-28T10:00:00", "T") == parse_time("2026-11-28T10:00:00Z", "T")
    for bad in ("yesterday", "-5", "nan", "inf"):
        with pytest.raises(click.BadParameter):
            parse_time(bad, "T")


def test_record_json_decodes_and_redacts() -> None:
    c = codec()
    acc = {"id": "main", "tenant_id": T, "host": "h", "port": 25, "user": "u", "password_enc": "cipher",
           "use_tls": None, "batch_size": None, "limit_per_minute": None, "limit_per_hour": None,
           "limit_per_day": None, "limit_behavior": "defer", "max_connections": None, "tls_verify": True,
           "ca_bundle_pem": None, "allow_insecure_auth": False, "created_ts": 1, "updated_ts": 1}
    env = {"command_id": "c1", "type": "account.upsert", "tenant_id": T, "actor": "admin", "ts": 5,
           "payload_schema": "Account", "payload": c.encode("Account", acc), "route": "POST /account"}
    r = SimpleNamespace(topic="postbus.commands", partition=1, offset=7, timestamp=5, key=T.encode(),
                        value=c.encode("CommandEnvelope", env))
    out = record_json(r)
    assert out["schema"] == "CommandEnvelope" and out["record"]["payload"]["password_enc"] == "***"
    assert "_payload" not in out["record"] and "cipher" not in str(out)
    assert command_entry(r)["_payload"]["password_enc"] == "cipher"  # internal only, never printed
    assert command_entry(r, history.TRACE_COMMANDS) is None  # not a type trace looks at
    assert command_entry(r, history.STATE_COMMANDS)["type"] == "account.upsert"
    junk = record_json(SimpleNamespace(topic="t", partition=0, offset=1, timestamp=1, key=None, value=b"junk"))
    assert junk["record"] is None and "undecodable" in junk
    tomb = record_json(SimpleNamespace(topic="t", partition=0, offset=2, timestamp=1, key=b"k", value=None))
    assert tomb["record"] is None and tomb["key"] == "k"
    dl = c.encode("DeadLetter", {"source_topic": "postbus.commands", "source_partition": 1, "source_offset": 7,
                                 "consumer": "sender", "reason": "bad", "ts": 9, "key": b"k",
                                 "value": c.encode("CommandEnvelope", env)})
    out = record_json(SimpleNamespace(topic="postbus.deadletter", partition=0, offset=3, timestamp=9, key=b"k",
                                      value=dl))
    assert out["record"]["value_schema"] == "CommandEnvelope" and "cipher" not in str(out)


def test_partition_for_matches_the_api() -> None:
    from services.api.command_log import partition_for as api_partition_for
    for tid in ("acme", "t0123456789", "ü-tenant"):
        assert partition_for(tid, 8) == api_partition_for(tid, 8)
