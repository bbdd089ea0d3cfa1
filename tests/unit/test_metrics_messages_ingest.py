"""Command and report records -> message projection rows (the ingest's decoding, no broker)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from services.common.avro import DecodeError, codec
from services.metrics import messages as mp
from services.metrics.ingest import Ingestor


@dataclass
class Rec:
    value: bytes
    offset: int


def command(ctype: str, schema: str, payload: dict[str, Any], tenant: str | None = "t-a", ts: int = 1234) -> bytes:
    c = codec()
    return c.encode("CommandEnvelope", {"command_id": "c", "type": ctype, "tenant_id": tenant, "actor": "admin",
                                        "ts": ts, "payload_schema": schema, "payload": c.encode(schema, payload),
                                        "route": None})


def rows_of(value: bytes, offset: int = 7) -> tuple[str | None, dict[str, list[list[Any]]]]:
    tables: dict[str, list[list[Any]]] = {"messages": [], "message_marks": [], "reported": []}
    ctype = Ingestor._command_rows(codec(), Rec(value, offset), tables)
    return ctype, tables


def test_add_messages_become_submission_rows_in_command_order() -> None:
    msg = {"id": "m1", "pk": "p1", "tenant_id": "t-a", "account_id": "acc", "from_addr": "a@x.test", "to": ["b@y"],
           "subject": "hi", "priority": 0, "deferred_ts": 5000, "batch_code": "b", "accepted_ts": 42}
    ctype, tables = rows_of(command("messages.add", "AddMessages", {"messages": [msg, {**msg, "id": "m2"}]}))
    assert ctype == "messages.add"
    rows = [dict(zip(mp.MESSAGE_COLUMNS, r, strict=True)) for r in tables["messages"]]
    assert [(r["id"], r["seq"]) for r in rows] == [("m1", 7 * mp.SEQ_STRIDE), ("m2", 7 * mp.SEQ_STRIDE + 1)]
    payload = json.loads(rows[0].pop("payload"))
    assert rows[0] == {"tenant_id": "t-a", "id": "m1", "pk": "p1", "account_id": "acc", "priority": 0,
                            "batch_code": "b", "deferred_ms": 5000, "accepted_ms": 42, "subject": "hi",
                            "from_addr": "a@x.test", "to_addrs": ["b@y"], "seq": 7 * mp.SEQ_STRIDE,
                            "rcpt_addrs": ["b@y"]}
    # the seed's payload: the message as submitted, in the client's field names
    assert payload == {"id": "m1", "account_id": "acc", "from": "a@x.test", "to": ["b@y"], "subject": "hi",
                       "batch_code": "b", "body": None, "priority": 0, "deferred_ts": 5.0}


def test_payload_excludes_secrets_and_attachment_contents() -> None:
    msg = {"id": "m1", "account_id": "acc", "from_addr": "a@x.test", "to": ["b@y"], "subject": "hi",
           "body_text": "text", "attachments": [
               {"filename": "a.txt", "fetch_mode": "base64", "storage_path": "c2VjcmV0IGNvbnRlbnQ=", "mime_type": None,
                "content_md5": None, "auth": None},
               {"filename": "b.pdf", "fetch_mode": "http_url",
                "storage_path": "https://u:pw@files.example/b.pdf?X-Amz-Signature=abc", "mime_type": None,
                "content_md5": None, "auth": {"method": "bearer", "user": None, "secret_enc": "gAAAA-secret"}}]}
    p = mp.submitted_payload(msg)
    text = json.dumps(p)
    for secret in ("c2VjcmV0IGNvbnRlbnQ=", "pw@", "X-Amz-Signature", "gAAAA-secret"):
        assert secret not in text
    assert p["body"] == "text"
    assert p["attachments"] == [{"filename": "a.txt", "fetch_mode": "base64"},
                                {"filename": "b.pdf", "fetch_mode": "http_url",
                                 "storage_path": "https://files.example/b.pdf", "auth": {"method": "bearer"}}]


def test_delete_cleanup_and_tenant_delete_become_marks() -> None:
    _, t = rows_of(command("messages.delete", "MessageIds", {"tenant_id": "t-a", "ids": ["m1", "m1", "m2"]}), 9)
    assert t["message_marks"] == [["t-a", "m1", "deleted", 9 * mp.SEQ_STRIDE, 1234],
                                  ["t-a", "m2", "deleted", 9 * mp.SEQ_STRIDE, 1234]]
    _, t = rows_of(command("messages.cleanup", "MessageIds", {"tenant_id": "t-a", "ids": ["m3"]}))
    assert [r[2] for r in t["message_marks"]] == ["cleaned"]
    _, t = rows_of(command("tenant.delete", "TenantRef", {"tenant_id": "t-b"}, tenant="t-b"))
    assert t["message_marks"] == [["t-b", "", "tenant_deleted", 7 * mp.SEQ_STRIDE, 1234]]
    ctype, t = rows_of(command("run-now", "RunNow", {"tenant_id": None, "override_dnd": False}))
    assert ctype is None and not any(t.values())
    with pytest.raises(DecodeError):
        rows_of(b"\x00garbage")


def test_report_acks_become_reported_rows() -> None:
    ack = codec().decode(codec().encode("ReportAck", {"tenant_id": "t", "event_ids": ["e1", "e2"],
                                                      "message_ids": ["m1", "m2"], "ts": 99}))[1]
    assert mp.reported_rows(ack) == [["t", "e1", "m1", 99], ["t", "e2", "m2", 99]]
