"""Command log: secret redaction, cursor encoding, filters, entry decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.api.command_log import (
    Filters,
    InvalidCursor,
    decode_cursor,
    encode_cursor,
    entry_of,
    partition_for,
    redact,
    to_ms,
)
from services.api.commands import Actor, CommandWriter
from services.common.redaction import REDACTED


def test_redact_replaces_secret_named_fields_recursively() -> None:
    payload = {
        "id": "t1",
        "client_auth_secret_enc": "gAAAA...",
        "password_enc": None,
        "key_hash": "abc",
        "bounce_imap_password_enc": "x",
        "messages": [{"id": "m1", "body_text": "hello password", "headers": {"Authorization": "Bearer x",
                                                                           "X-Campaign": "spring"}}],
        "nested": {"api_key": "pbk_1", "token": "t", "client_secret": "s", "keep": 1},
        "raw": b"\x00\x01",
    }
    out = redact(payload)
    assert out["id"] == "t1"
    assert out["client_auth_secret_enc"] == REDACTED
    assert out["password_enc"] is None  # no secret set: nothing to hide
    assert out["key_hash"] == REDACTED and out["bounce_imap_password_enc"] == REDACTED
    msg = out["messages"][0]
    assert msg["body_text"] == "hello password"  # values are not secrets, names are
    assert msg["headers"] == {"Authorization": REDACTED, "X-Campaign": "spring"}
    assert out["nested"] == {"api_key": REDACTED, "token": REDACTED, "client_secret": REDACTED, "keep": 1}
    assert out["raw"] == "AAE="
    assert payload["key_hash"] == "abc"  # the input is not modified


def test_cursor_round_trip_and_is_opaque_text() -> None:
    offsets = {0: 12, 3: 0, 7: 123456789}
    cur = encode_cursor(offsets)
    assert cur.isascii() and "{" not in cur and "=" not in cur
    assert decode_cursor(cur) == offsets


@pytest.mark.parametrize("bad", ["", "!!!", "bm90IGpzb24", encode_cursor({0: 1})[:-3] + "xyz",
                                 "eyJ2IjoyLCJvIjp7fX0", "eyJ2IjoxLCJvIjp7IjAiOi0xfX0", "eyJ2IjoxfQ"])
def test_bad_cursors_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(bad)


def test_to_ms_accepts_seconds_and_milliseconds() -> None:
    assert to_ms(None) is None
    assert to_ms(1_700_000_000) == 1_700_000_000_000
    assert to_ms(1_700_000_000.5) == 1_700_000_000_500
    assert to_ms(1_700_000_000_123) == 1_700_000_000_123


def test_partition_for_matches_the_producer_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for tid in ("acme", "t0123456789", "x"):
        parts = list(range(8))
        assert partition_for(tid, 8) == DefaultPartitioner()(tid.encode(), parts, parts)


def test_filters() -> None:
    e = {"tenant_id": "a", "ts": 1000, "type": "tenant.create", "route": "POST /tenant"}
    assert Filters().match(e)
    assert Filters(tenant_id="a", since_ms=1000, until_ms=1000, route="POST /tenant").match(e)
    assert Filters(route="/tenant").match(e)
    assert not Filters(route="/account").match(e)
    assert not Filters(tenant_id="b").match(e)
    assert not Filters(since_ms=1001).match(e)
    assert not Filters(until_ms=999).match(e)
    assert not Filters(type="account.upsert").match(e)


def test_entry_of_decodes_and_redacts_a_real_envelope() -> None:
    _, value = CommandWriter.envelope(
        "account.upsert", "acme", Actor("tenant", "acme", "k1"), "POST /account", "Account",
        {"id": "main", "tenant_id": "acme", "host": "smtp.test", "port": 587, "password_enc": "secret!",
         "created_ts": 1, "updated_ts": 2})
    entry = entry_of(SimpleNamespace(value=value, partition=3, offset=9))
    assert entry is not None
    assert entry["type"] == "account.upsert" and entry["tenant_id"] == "acme"
    assert entry["actor"] == "tenant:acme/key:k1" and entry["route"] == "POST /account"
    assert entry["payload_schema"] == "Account" and entry["outcome"] == "accepted"
    assert entry["payload"]["password_enc"] == REDACTED and entry["payload"]["host"] == "smtp.test"
    assert (entry["partition"], entry["offset"]) == (3, 9)
    assert entry_of(SimpleNamespace(value=b"garbage", partition=0, offset=0)) is None
