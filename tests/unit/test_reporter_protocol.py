"""Pure logic of the reporter: report items, answer parsing, backoff, sync URL."""

from __future__ import annotations

import json
import random

import pytest

from services.reporter.protocol import backoff_delay, parse_answer, report_item, sync_url


def _event(kind: str, **extra: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "event_id": "e1", "type": kind, "tenant_id": "acme", "message_id": "MSG-1",
        "pk": "pk-1", "ts": 1728458400123, "smtp_code": None, "error": None,
        "deferred_reason": None, "deferred_until": None,
    }
    ev.update(extra)
    return ev


def test_sent_item() -> None:
    expected = {"id": "MSG-1", "tenant_id": "acme", "pk": "pk-1", "sent_ts": 1728458400.123}
    assert report_item(_event("sent")) == expected
    assert report_item(_event("sent", smtp_code=250)) == expected  # the seed's sent item: no code


def test_error_item_carries_error_and_code() -> None:
    item = report_item(_event("error", error="SMTP timeout", smtp_code=451))
    assert item == {
        "id": "MSG-1", "tenant_id": "acme", "pk": "pk-1", "error_ts": 1728458400.123,
        "error": "SMTP timeout", "smtp_code": 451,
    }


def test_error_without_text_falls_back_to_code() -> None:
    assert report_item(_event("error", smtp_code=550))["error"] == "SMTP 550"  # type: ignore[index]


def test_rejected_is_reported_as_error() -> None:
    item = report_item(_event("rejected", error="rate limit (reject)"))
    assert item is not None
    assert item["error_ts"] == 1728458400.123 and item["error"] == "rate limit (reject)"
    assert "sent_ts" not in item
    assert report_item(_event("rejected"))["error"] == "rejected"  # type: ignore[index]


def test_deferred_item() -> None:
    item = report_item(_event("deferred", deferred_reason="rate_limit_minute", deferred_until=1728458460000))
    assert item == {
        "id": "MSG-1", "tenant_id": "acme", "pk": "pk-1", "deferred_ts": 1728458400.123,
        "deferred_reason": "rate_limit_minute", "deferred_until": 1728458460.0,
    }


def test_unknown_type_is_not_reported() -> None:
    assert report_item(_event("opened")) is None
    assert report_item(_event("")) is None


def test_item_is_json_serialisable_and_in_seconds() -> None:
    item = report_item(_event("sent", pk=None))
    assert item is not None
    assert json.loads(json.dumps(item))["pk"] is None
    assert 1e9 < item["sent_ts"] < 1e10


@pytest.mark.parametrize(
    ("body", "queued", "nsa"),
    [
        (b'{"ok": true}', 0, None),
        (b'{"ok": true, "queued": 15, "error": [], "not_found": []}', 15, None),
        (b'{"ok": true, "next_sync_after": 1706003600}', 0, 1706003600.0),
        (b'{"ok": true, "next_sync_after": 1706003600000}', 0, 1706003600.0),  # ms tolerated
        (b'{"queued": "3"}', 3, None),
        (b'{"ok": true, "queued": -4, "next_sync_after": "soon"}', 0, None),
        (b'{"ok": true, "queued": true}', 0, None),
    ],
)
def test_answer_acknowledged(body: bytes, queued: int, nsa: float | None) -> None:
    a = parse_answer(200, body)
    assert a.acked and a.outcome == "ok"
    assert a.queued == queued
    assert a.next_sync_after == nsa


def test_answer_lists() -> None:
    a = parse_answer(200, b'{"ok": true, "error": ["A"], "not_found": ["B", 3]}')
    assert a.errors == ["A"] and a.not_found == ["B", "3"]


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (500, b'{"ok": true}', "http_500"),
        (404, b"", "http_404"),
        (302, b"", "http_302"),
        (200, b"<html>ok</html>", "bad_body"),
        (200, b"", "bad_body"),
        (200, b"[1, 2]", "bad_body"),
        (200, b"\xff\xfe", "bad_body"),
        (200, b'{"ok": false, "error": ["MSG-1"]}', "refused"),
    ],
)
def test_answer_not_acknowledged(status: int, body: bytes, outcome: str) -> None:
    a = parse_answer(status, body)
    assert not a.acked
    assert a.outcome == outcome
    assert a.queued == 0 and a.next_sync_after is None


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt, step in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0)]:
        for _ in range(50):
            d = backoff_delay(attempt, base_s=1.0, cap_s=60.0, rng=rng)
            assert step / 2 <= d <= step
    for _ in range(50):
        assert 30.0 <= backoff_delay(30, cap_s=60.0, rng=rng) <= 60.0
    assert backoff_delay(1000, cap_s=5.0, rng=rng) <= 5.0


def test_backoff_is_jittered() -> None:
    rng = random.Random(1)
    assert len({round(backoff_delay(4, rng=rng), 6) for _ in range(20)}) > 10


def test_sync_url() -> None:
    t = {"client_base_url": "https://api.acme.com/", "client_sync_path": "/hooks/sync"}
    assert sync_url(t, "/mail-proxy/sync") == "https://api.acme.com/hooks/sync"
    assert sync_url({"client_base_url": "http://h:8080"}, "/mail-proxy/sync") == "http://h:8080/mail-proxy/sync"
    assert sync_url({"client_base_url": "http://h", "client_sync_path": "s"}, "/d") == "http://h/s"
    assert sync_url({"client_base_url": None}, "/d") is None
    assert sync_url({"client_base_url": "  "}, "/d") is None
