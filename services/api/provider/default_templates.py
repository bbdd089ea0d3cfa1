"""Built-in templates (``smtp-template-default``): read-only starting points. A user copies one
with ``smtp-template-add``; ``welcome`` is the body of ``smtp-welcome-mail``. Variables: ``email``,
``name``, custom fields, ``unsubscribe_url`` (campaigns), ``shop_name`` (welcome mail)."""

from __future__ import annotations

from typing import Any

WELCOME = "welcome"

DEFAULT_TEMPLATES: list[dict[str, Any]] = [
    {"id": "default-welcome", "key": WELCOME, "name": "Welcome", "subject": "Welcome to {{ shop_name }}",
     "html_body": (
         "<html><body style=\"font-family: sans-serif\">"
         "<h1>Welcome to {{ shop_name }}!</h1>"
         "<p>Thank you for joining {{ shop_name }}. We are glad to have you with us.</p>"
         "<p>If you have any question, just reply to this email.</p>"
         "<p>The {{ shop_name }} team</p>"
         "</body></html>")},
    {"id": "default-newsletter", "key": "newsletter", "name": "Newsletter", "subject": "News from us",
     "html_body": (
         "<html><body style=\"font-family: sans-serif\">"
         "<p>Hello {{ name or email }},</p>"
         "<h1>Our latest news</h1>"
         "<p>Write your news here.</p>"
         "<p style=\"font-size: 12px; color: #888\"><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>"
         "</body></html>")},
    {"id": "default-announcement", "key": "announcement", "name": "Announcement", "subject": "An announcement",
     "html_body": (
         "<html><body style=\"font-family: sans-serif\">"
         "<p>Hello {{ name or email }},</p>"
         "<p>We have something to tell you.</p>"
         "<p style=\"font-size: 12px; color: #888\"><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>"
         "</body></html>")},
    {"id": "default-plain", "key": "plain", "name": "Plain message", "subject": None,
     "html_body": (
         "<html><body><p>Hello {{ name or email }},</p><p></p>"
         "<p style=\"font-size: 12px\"><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p></body></html>")},
]


def by_key(key: str) -> dict[str, Any]:
    return next(t for t in DEFAULT_TEMPLATES if t["key"] == key)
