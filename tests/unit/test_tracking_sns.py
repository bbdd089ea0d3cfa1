"""Tracking tokens, the html rewrite/List-Unsubscribe transform, the suppression split and SNS
signature checks (with a real test CA and HTTPS server)."""

from __future__ import annotations

import asyncio
import email
import re
from email import policy
from pathlib import Path

import pytest

from services.common import track_tokens as tt
from services.common.sns import (
    ReplayCache,
    SnsError,
    StaleMessage,
    Verifier,
    allowed_topics,
    check_timestamp,
    check_url,
)
from services.sender import suppression
from services.sender.mime import build_message
from services.sender.tracking import apply, rewrite_html
from tests.support.sns_server import SnsTestServer, ses_bounce

KEY = b"k" * 32
MSG = {"id": "m1", "pk": "p1", "tenant_id": "t1", "account_id": "main", "from_addr": "a@x.test",
       "to": ["Bob <Bob@Example.test>"], "cc": [], "bcc": [], "subject": "s", "body_text": "hi",
       "body_html": '<html><body><a href="https://example.org/a?x=1&amp;y=2">a</a> <a href="mailto:z@x">m</a>'
                    '</body></html>', "headers": {}, "accepted_ts": 0}


def test_tokens_roundtrip_and_refuse_forgery_expiry_and_kind() -> None:
    tok = tt.mint(KEY, "c", "t1", "m1", "bob@example.test", url="https://example.org/", ttl_s=60)
    got = tt.verify(KEY, tok, "c")
    assert got and got.url == "https://example.org/" and got.recipient == "bob@example.test"
    assert tt.verify(KEY, tok, "o") is None  # another kind
    assert tt.verify(b"x" * 32, tok, "c") is None  # another key
    body, sig = tok.split(".")
    assert tt.verify(KEY, body[:-2] + "AA." + sig, "c") is None  # altered payload
    assert tt.verify(KEY, tt.mint(KEY, "o", "t1", "m1", None, ttl_s=10, now=0), "o") is None  # expired
    assert tt.verify(KEY, "garbage", "o") is None and tt.verify(KEY, "a.b.c", "o") is None
    with pytest.raises(ValueError):
        tt.mint(KEY, "c", "t1", "m1", None, url="javascript:alert(1)", ttl_s=60)


def test_rewrite_keeps_non_http_links_and_adds_pixel() -> None:
    out = rewrite_html(MSG["body_html"], pixel="https://t/o/X", link=lambda u: "https://t/c/" + u.replace("&", "+"))
    assert 'href="https://t/c/https://example.org/a?x=1+y=2"' in out
    assert 'href="mailto:z@x"' in out
    assert out.index('src="https://t/o/X"') < out.index("</body>")


def test_transform_tracks_html_and_adds_one_click_headers() -> None:
    tenant = {"tracking_opens": True, "tracking_clicks": True, "tracking_unsubscribe": True}
    data = apply(build_message(MSG), MSG, tenant, key=KEY, base="https://trk.test", ttl_s=60, mailto="u@x.test")
    mail = email.message_from_bytes(data, policy=policy.default)
    html = mail.get_body(("html",)).get_content()
    click = re.search(r'href="https://trk\.test/t/c/([^"]+)"', html).group(1)
    assert tt.verify(KEY, click, "c").url == "https://example.org/a?x=1&y=2"
    pixel = re.search(r'src="https://trk\.test/t/o/([^"]+)"', html).group(1)
    assert tt.verify(KEY, pixel, "o").message_id == "m1"
    assert mail.get_body(("plain",)).get_content().strip() == "hi"
    unsub = re.search(r"<https://trk\.test/u/([^>]+)>", str(mail["List-Unsubscribe"])).group(1)
    assert tt.verify(KEY, unsub, "u").recipient == "bob@example.test"
    assert "mailto:u@x.test" in str(mail["List-Unsubscribe"])
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["X-Postbus-Message-Id"] == "m1"


def test_transform_is_off_by_default_and_per_message_override_wins() -> None:
    raw = build_message(MSG)
    assert apply(raw, MSG, None, key=KEY, base="https://t", ttl_s=60) == raw
    off = apply(raw, {**MSG, "track_clicks": False}, {"tracking_clicks": True}, key=KEY, base="https://t", ttl_s=60)
    assert off == raw


def test_suppression_split() -> None:
    entries = {"t1/bob@example.test": {"reason": "hard_bounce"}}
    keep, dropped = suppression.split({**MSG, "cc": ["carol@example.test"]}, entries.get)
    assert keep == {"to": [], "cc": ["carol@example.test"], "bcc": []}
    assert [a for a, _ in dropped] == ["bob@example.test"]
    assert suppression.reason_text("bob@example.test", dropped[0][1]) == "suppressed: hard bounce (bob@example.test)"


def test_sns_url_rules() -> None:
    pattern = Verifier("^sns\\.[a-z0-9-]+\\.amazonaws\\.com$").host_pattern
    assert check_url("https://sns.eu-west-1.amazonaws.com/x.pem", pattern)
    for bad in ("http://sns.eu-west-1.amazonaws.com/x.pem", "https://sns.eu-west-1.amazonaws.com.evil.test/x.pem",
                "https://evil.test/sns.eu-west-1.amazonaws.com/x.pem", "https://u@sns.eu-west-1.amazonaws.com/x",
                "https://sns.eu-west-1.amazonaws.com:8443/x.pem", None):
        with pytest.raises(SnsError):
            check_url(bad, pattern)


def test_sns_signatures_v1_v2_forged_and_wrong_host(tmp_path: Path) -> None:
    server = SnsTestServer(tmp_path / "ca.pem").start()
    try:
        verifier = Verifier(r"^localhost:\d+$", str(tmp_path / "ca.pem"))
        note = server.notification(ses_bounce("t1", "m1", "bob@example.test", "a@x.test"))

        async def run() -> None:
            await verifier.verify(server.sign(note, 2))
            await verifier.verify(server.sign(note, 1))
            forged = {**server.sign(note, 2), "Message": "{}"}
            with pytest.raises(SnsError, match="does not verify"):
                await verifier.verify(forged)
            with pytest.raises(SnsError, match="SNS host"):
                await verifier.verify(server.sign(note, 2, cert_url="https://evil.example.com/x.pem"))
            with pytest.raises(SnsError, match="https"):
                await verifier.verify(server.sign(note, 2, cert_url=server.cert_url.replace("https", "http")))
            with pytest.raises(SnsError, match="SignatureVersion"):
                await verifier.verify({**server.sign(note, 2), "SignatureVersion": "3"})
            # a CA the verifier does not trust: the certificate cannot be fetched
            with pytest.raises(SnsError, match="fetched"):
                await Verifier(r"^localhost:\d+$").verify(server.sign(note, 2))
            sub = server.sign(server.subscription(), 2)
            await verifier.verify(sub)
            await verifier.confirm(sub)

        asyncio.run(run())
        assert len(server.confirmations) == 1
    finally:
        server.stop()


def test_sns_topic_list_timestamp_window_and_replay_cache() -> None:
    assert allowed_topics("") == frozenset() and allowed_topics(" , ") == frozenset()
    assert allowed_topics("arn:a, arn:b") == {"arn:a", "arn:b"}
    now = 1_700_000_000.0
    ok = {"Timestamp": "2023-11-14T22:13:20.000Z"}  # == now
    assert check_timestamp(ok, 3600, 300, now=now) == now
    assert check_timestamp(ok, 3600, 300, now=now + 3599) == now
    assert check_timestamp(ok, 3600, 300, now=now - 299) == now  # the sender's clock a little ahead
    for msg, at in ((ok, now + 3601), (ok, now - 301), ({"Timestamp": "yesterday"}, now), ({}, now),
                    ({"Timestamp": "2023-11-14T22:13:20"}, now)):  # no time zone
        with pytest.raises(StaleMessage):
            check_timestamp(msg, 3600, 300, now=at)

    cache = ReplayCache(3600, 300, max_entries=3)
    assert cache.reserve("a", now, now=now) and not cache.reserve("a", now, now=now + 10)
    cache.release("a")  # a failed attempt: SNS's retry of the same id is accepted
    assert cache.reserve("a", now, now=now + 20)
    assert cache.reserve("b", now, now=now) and cache.reserve("c", now, now=now) and cache.reserve("d", now, now=now)
    assert len(cache) == 3 and cache.overflowed == 1  # bounded: the oldest id went first
    # ids leave once their Timestamp is out of the window (the Timestamp check refuses them then)
    assert cache.reserve("e", now + 4000, now=now + 3901) and len(cache) == 1
