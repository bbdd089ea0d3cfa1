"""``Codec.peek_type`` (services/common/avro.py): the sender's agents skip the events and commands
they do not handle by reading the ``type`` field straight from the bytes. It must say exactly what
a full decode says, or None (then the agent decodes)."""

from __future__ import annotations

from services.common.avro import MAGIC, codec

EVENT = {"event_id": "e1", "type": "bounce", "tenant_id": "t", "account_id": None, "message_id": "m",
         "pk": None, "ts": 1, "accepted_ts": None, "attempt": 1}


def test_peek_type_agrees_with_decode() -> None:
    c = codec()
    for etype in ("sent", "bounce", "complaint", "deferred", "x" * 300):  # a long type: a 2-byte length
        data = c.encode("DeliveryEvent", {**EVENT, "type": etype})
        assert c.peek_type(data, "DeliveryEvent") == etype == c.decode(data)[1]["type"]
    env = c.encode("CommandEnvelope", {"command_id": "c1", "type": "messages.add", "tenant_id": "t",
                                       "actor": "tenant", "ts": 1, "payload_schema": "AddMessages",
                                       "payload": b"\x00" * 2000, "route": "POST /commands/add-messages"})
    assert c.peek_type(env, "CommandEnvelope") == "messages.add" == c.decode(env)[1]["type"]


def test_peek_type_declines_what_it_cannot_read() -> None:
    c = codec()
    data = c.encode("DeliveryEvent", EVENT)
    assert c.peek_type(data, "DeliveryEvent") == "bounce"  # positive control
    assert c.peek_type(data, "CommandEnvelope") is None  # another schema than expected
    assert c.peek_type(data[:12], "DeliveryEvent") is None  # truncated
    assert c.peek_type(b"not avro at all", "DeliveryEvent") is None
    assert c.peek_type(MAGIC + b"\x00" * 8 + data[10:], "DeliveryEvent") is None  # unknown fingerprint
    assert c.peek_type(None, "DeliveryEvent") is None
