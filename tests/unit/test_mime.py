from __future__ import annotations

import base64
import email
from email import policy

from services.sender.mime import (
    CORRELATION_HEADER,
    build_message,
    envelope_recipients,
    envelope_sender,
    message_id_for,
)


def _msg(**kw):
    base = {"id": "m-1", "pk": "pk-1", "tenant_id": "acme", "account_id": "main", "from_addr": "app@acme.test",
            "to": ["bob@example.test"], "cc": [], "bcc": [], "reply_to": None, "return_path": None,
            "subject": "Hello", "body_text": "Hi Bob", "body_html": None, "headers": {}, "message_id": None,
            "attachments": []}
    base.update(kw)
    return base


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def test_plain_message_headers_and_body() -> None:
    e = parse(build_message(_msg()))
    assert e["From"] == "app@acme.test"
    assert e["To"] == "bob@example.test"
    assert e["Subject"] == "Hello"
    assert e["Message-ID"] == "<pk-1@acme.test>"
    assert e[CORRELATION_HEADER] == "m-1"
    assert e.get_content_type() == "text/plain"
    assert e.get_content().strip() == "Hi Bob"


def test_unicode_everywhere_round_trips() -> None:
    e = parse(build_message(_msg(from_addr="Zoë <z@acme.test>", subject="Ciao è ✓", body_text="Grüße\n" + "x" * 2000,
                                 to=["Jürgen <j@example.test>"])))
    assert e["Subject"] == "Ciao è ✓"
    assert "Zoë" in str(e["From"])
    assert "Jürgen" in str(e["To"])
    assert e.get_content().startswith("Grüße")


def test_text_and_html_make_multipart_alternative_and_bcc_is_hidden() -> None:
    data = build_message(_msg(body_html="<p>Hi</p>", cc=["c@example.test"], bcc=["secret@example.test"],
                              reply_to="r@acme.test", headers={"X-Campaign": "q4"}))
    assert b"secret@example.test" not in data
    e = parse(data)
    assert e.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in e.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    assert e["Cc"] == "c@example.test" and e["Reply-To"] == "r@acme.test" and e["X-Campaign"] == "q4"


def test_attachments_make_multipart_mixed() -> None:
    att = {"filename": "a.txt", "storage_path": "base64:" + base64.b64encode(b"data!").decode(),
           "fetch_mode": "base64", "mime_type": "text/plain", "content_md5": None}
    e = parse(build_message(_msg(), [(att, b"data!")]))
    assert e.get_content_type() == "multipart/mixed"
    attachments = list(e.iter_attachments())
    assert attachments[0].get_filename() == "a.txt"
    assert attachments[0].get_content() in ("data!", b"data!")


def test_envelope_uses_return_path_and_all_recipients() -> None:
    msg = _msg(return_path="bounce@acme.test", cc=["C <c@x.test>"], bcc=["b@x.test"])
    assert envelope_sender(msg) == "bounce@acme.test"
    assert envelope_recipients(msg) == ["bob@example.test", "c@x.test", "b@x.test"]
    assert envelope_sender(_msg()) == "app@acme.test"


def test_custom_message_id_kept() -> None:
    assert message_id_for(_msg(message_id="abc@x")) == "<abc@x>"
    assert message_id_for(_msg(message_id="<abc@x>")) == "<abc@x>"
