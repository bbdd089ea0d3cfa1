from __future__ import annotations

import pytest

from services.api.message_validation import Rejected, infer_fetch_mode, normalize_priority, validate_message


def check(raw, **kw):
    return validate_message(
        raw,
        default_priority=kw.get("default_priority", 2),
        account_exists=lambda t, a: (t, a) == ("acme", "main"),
        tenant_exists=lambda t: t in ("acme", "other"),
        now_ms=123,
    )


GOOD = {"id": "m1", "tenant_id": "acme", "account_id": "main", "from": "App <app@acme.test>",
        "to": "a@x.test, B <b@y.test>", "subject": "Hi", "body": "text"}


def test_good_message_normalised() -> None:
    rec = check(GOOD)
    assert rec["to"] == ["a@x.test", "B <b@y.test>"]
    assert rec["body_text"] == "text" and rec["body_html"] is None
    assert rec["priority"] == 2 and rec["accepted_ts"] == 123 and rec["pk"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": None}, "missing id"),
        ({"tenant_id": None}, "missing tenant_id"),
        ({"account_id": ""}, "missing account_id"),
        ({"from": None}, "missing from"),
        ({"to": []}, "missing to"),
        ({"subject": None}, "missing subject"),
        ({"to": ["not-an-address"]}, "invalid address in to"),
        ({"from": "bad@@x"}, "invalid address in from"),
        ({"cc": ["ok@x.test", "nope"]}, "invalid address in cc"),
        ({"account_id": "ghost"}, "account not found for tenant"),
        ({"tenant_id": "ghost"}, "tenant not found"),
        ({"tenant_id": "other"}, "account not found for tenant"),
        ({"headers": {"X-A": "a\r\nBcc: evil@x.test"}}, "invalid value for header"),
        ({"headers": {"Bad Name": "v"}}, "invalid header name"),
        ({"subject": "a\nb"}, "invalid subject"),
        ({"content_type": "rtf"}, "invalid content_type"),
        ({"deferred_ts": "tomorrow"}, "invalid deferred_ts"),
        ({"attachments": [{"filename": "a", "storage_path": "base64:!!!"}]}, "not valid base64"),
    ],
)
def test_rejections(change, reason) -> None:
    raw = {**GOOD, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(Rejected, match=reason):
        check(raw)


def test_html_and_both_parts() -> None:
    assert check({**GOOD, "content_type": "html"})["body_html"] == "text"
    both = check({**{k: v for k, v in GOOD.items() if k != "body"}, "text": "t", "html": "<p>h</p>"})
    assert (both["body_text"], both["body_html"]) == ("t", "<p>h</p>")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (3, 3), (9, 3), (-4, 0), ("immediate", 0), ("high", 1), ("medium", 2), ("low", 3), ("LOW", 3),
     ("garbage", 2), (None, 2), (True, 2), ("1", 1), ([1], 2)],
)
def test_priority(value, expected) -> None:
    assert normalize_priority(value) == expected


def test_default_priority_applies() -> None:
    assert check(GOOD, default_priority=0)["priority"] == 0
    assert check({**GOOD, "priority": "low"}, default_priority=0)["priority"] == 3


def test_deferred_ts_seconds_to_ms() -> None:
    assert check({**GOOD, "deferred_ts": 1700000000})["deferred_ts"] == 1700000000000


@pytest.mark.parametrize(
    ("path", "mode"),
    [("base64:AAAA", "base64"), ("https://x/y.pdf", "http_url"), ("s3://b/k", "storage"), ("/abs/file", "storage"),
     ("doc_id=5", "endpoint")],
)
def test_fetch_mode_inference(path, mode) -> None:
    assert infer_fetch_mode(path) == mode


def test_tracking_flags() -> None:
    assert check(GOOD)["track_opens"] is None
    rec = check({**GOOD, "track_opens": True, "track_clicks": False})
    assert (rec["track_opens"], rec["track_clicks"]) == (True, False)
    with pytest.raises(Rejected, match="invalid track_clicks"):
        check({**GOOD, "track_clicks": "yes"})
