"""Open/click tracking and List-Unsubscribe: a pipeline transform.

Transform: for a tenant (or message) with tracking on, the html part gets a 1x1 pixel
(``/t/o/<token>``) and its http(s) links point to ``/t/c/<token>`` (the token carries the original
URL, signed); with ``tracking_unsubscribe`` every message gets ``List-Unsubscribe`` (https and, when
configured, mailto) and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058). Tokens
name the message's first To recipient. The transform runs first of all transforms (before any
signature): it is inserted at the head of the list.

The engagement commands that the API appends for each open/click/unsubscribe become delivery
events in ``services/sender/engagement.py``."""

from __future__ import annotations

import html as htmlmod
import logging
import re
from email import policy
from email.parser import BytesParser
from typing import Any

from services.common import track_tokens as tt
from services.common.settings import Settings, get_settings
from services.sender import pipeline
from services.sender.addresses import parse_list

log = logging.getLogger("postbus.sender.tracking")

_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
ENGAGEMENT_COMMANDS = frozenset({"tracking.open", "tracking.click", "tracking.unsubscribe",
                                 "feedback.bounce", "feedback.complaint"})


def base_url(settings: Settings, tenant: dict[str, Any] | None) -> str:
    domain = (tenant or {}).get("tracking_domain")
    if domain:
        return f"https://{domain}"
    return (settings.tracking_base_url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")


def flags(message: dict[str, Any], tenant: dict[str, Any] | None) -> tuple[bool, bool, bool]:
    """(opens, clicks, unsubscribe): a message's own track_opens/track_clicks win over the tenant's."""
    t = tenant or {}
    opens = message.get("track_opens")
    clicks = message.get("track_clicks")
    return (bool(t.get("tracking_opens")) if opens is None else bool(opens),
            bool(t.get("tracking_clicks")) if clicks is None else bool(clicks),
            bool(t.get("tracking_unsubscribe")))


def first_recipient(message: dict[str, Any]) -> str | None:
    addrs = [a for _, a in parse_list(message.get("to") or []) if a]
    return addrs[0].lower() if addrs else None


def rewrite_html(html: str, *, pixel: str | None, link: Any) -> str:
    """Links through ``link(url) -> tracked url`` (None: leave as is), then the pixel before </body>."""
    if link is not None:
        def sub(m: re.Match[str]) -> str:
            url = htmlmod.unescape(m.group(3)).strip()
            if not tt.safe_url(url):
                return m.group(0)  # mailto:, anchors, relative links stay
            return f"{m.group(1)}{m.group(2)}{htmlmod.escape(link(url), quote=True)}{m.group(2)}"

        html = _HREF.sub(sub, html)
    if pixel is not None:
        img = f'<img src="{htmlmod.escape(pixel, quote=True)}" width="1" height="1" alt="" style="display:none">'
        ends = list(_BODY_END.finditer(html))
        html = html[:ends[-1].start()] + img + html[ends[-1].start():] if ends else html + img
    return html


def apply(data: bytes, message: dict[str, Any], tenant: dict[str, Any] | None, *, key: bytes, base: str,
          ttl_s: int, mailto: str | None = None) -> bytes:
    opens, clicks, unsub = flags(message, tenant)
    if not (opens or clicks or unsub):
        return data
    tenant_id, mid, account = message["tenant_id"], message["id"], message.get("account_id")
    rcpt = first_recipient(message)

    def token(kind: str, url: str | None = None) -> str:
        return tt.mint(key, kind, tenant_id, mid, rcpt, account_id=account, url=url, ttl_s=ttl_s)

    mail = BytesParser(policy=policy.SMTP).parsebytes(data)
    if opens or clicks:
        for part in mail.walk():
            if part.get_content_type() != "text/html" or part.get_content_disposition() == "attachment":
                continue
            html = part.get_content()
            new = rewrite_html(html, pixel=f"{base}/t/o/{token('o')}" if opens else None,
                               link=(lambda url: f"{base}/t/c/{token('c', url)}") if clicks else None)
            if new != html:
                part.set_content(new, subtype="html", charset="utf-8")
    if unsub and rcpt:
        utoken = token("u")
        value = f"<{base}/u/{utoken}>"
        if mailto:
            value += f", <mailto:{mailto}?subject=unsubscribe%20{utoken}>"
        del mail["List-Unsubscribe"], mail["List-Unsubscribe-Post"]
        mail["List-Unsubscribe"] = value
        mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return mail.as_bytes()


_key: list[bytes] = []


def _tracking_key(settings: Settings) -> bytes:
    if not _key:
        _key.append(tt.key_from_settings(settings))
    return _key[0]


async def transform(ctx: pipeline.SendContext, data: bytes) -> bytes:
    if not any(flags(ctx.message, ctx.tenant)):
        return data  # the common case: no parsing at all
    settings = get_settings()
    return apply(data, ctx.message, ctx.tenant, key=_tracking_key(settings), base=base_url(settings, ctx.tenant),
                 ttl_s=settings.tracking_token_ttl_days * 86400, mailto=settings.unsubscribe_mailto)




def engagement_event(command_id: str, hit: dict[str, Any]) -> dict[str, Any]:
    """The DeliveryEvent of one engagement/feedback command."""
    return {
        "event_id": f"eng-{command_id}",
        "type": hit["kind"],
        "tenant_id": hit["tenant_id"],
        "account_id": hit.get("account_id"),
        "message_id": hit["message_id"],
        "pk": None,
        "ts": hit["ts"],
        "accepted_ts": None,
        "attempt": 0,
        "smtp_code": None,
        "error": None,
        "deferred_reason": None,
        "deferred_until": None,
        "batch_code": None,
        "sender_domain": hit.get("sender_domain"),
        "recipients": 1 if hit.get("recipient") else 0,
        "recipient": hit.get("recipient"),
        "bounce_type": hit.get("bounce_type"),
        "bounce_code": hit.get("bounce_code"),
        "bounce_reason": hit.get("bounce_reason"),
        "pec_event": None,
        "feedback_type": hit.get("feedback_type"),
        "url": hit.get("url"),
        "source": hit.get("source"),
    }
