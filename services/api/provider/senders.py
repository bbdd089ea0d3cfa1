"""Provider senders: ``smtp-sender-list``, ``smtp-domain-sender-add``, ``smtp-domain-sender-verify``
and the verification link ``GET /api/v1/smtp-sender-confirm?token=...`` (public: the link is the
credential).

A sender is a From address on one of the tenant's domains, owned by the user that added it; it is
unique for its domain (across the tenant's users). ``sender-verify`` mails a signed link (HMAC,
key derived from the instance secret for this purpose only, expiring after
``provider_sender_link_ttl_s``) to the address through the operator's system SMTP account; following
it writes ``provider.sender.verified``. A link names the sender id and address: it stops working
if the sender was removed or changed."""

from __future__ import annotations

import hashlib
import hmac
import time
from html import escape
from typing import Any
from urllib.parse import quote

from fastapi import Depends, Query, Request
from pydantic import BaseModel, Field

from services.api.commands import ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.provider import system_mail
from services.api.provider.auth import ProviderUser, checked_user
from services.api.provider.common import email_domain, iso, now_ms, valid_email, write, write_fenced
from services.api.provider.domains import tenant_domain
from services.api.provider.envelope import ProviderError, errors, ok, provider_router
from services.api.provider.ids import next_id
from services.api.state import ApiState
from services.common import signed_links
from services.common.topics import CONFIG_PROVIDER_SENDERS

router = provider_router(prefix="/api/v1", tags=["provider"])
_LINK_PREFIX = "provider-sender:"


class SenderAddIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    domain_name: str = Field(..., max_length=253)
    sender_name: str | None = Field(None, max_length=200)
    from_email: str = Field(..., max_length=254)


class SenderVerifyIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    from_email: str = Field(..., max_length=254)


def sender_out(rec: dict[str, Any]) -> dict[str, Any]:
    return {"id": int(rec["sender_id"]), "user_id": int(rec["user_id"]), "domain_name": rec["domain_name"],
            "sender_name": rec.get("sender_name"), "from_email": rec["from_email"], "verified": bool(rec["verified"]),
            "created_at": iso(rec["created_ts"]), "verified_at": iso(rec.get("verified_ts"))}


def tenant_senders(st: ApiState, tenant_id: str) -> list[dict[str, Any]]:
    return [v for v in list(st.provider.senders.items.values()) if v["tenant_id"] == tenant_id]


def user_sender(st: ApiState, user: ProviderUser, from_email: str) -> dict[str, Any] | None:
    email = from_email.strip().lower()
    for rec in st.provider.of_user(st.provider.senders, user.tenant_id, user.user_id):
        if rec["from_email"] == email:
            return rec
    return None


def _link_key(st: ApiState) -> bytes:
    return hmac.new(signed_links.link_key(st.settings), b"provider-sender-verification", hashlib.sha256).digest()


def _base_url(st: ApiState) -> str:
    s = st.settings
    return (s.provider_public_base_url or f"http://{s.api_host}:{s.api_port}").rstrip("/")


@router.get("/smtp-sender-list", summary="List the user's senders", responses=errors(401, 403, 422))
async def sender_list(request: Request, user_id: int | None = Query(None),
                      user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    recs = sorted(st.provider.of_user(st.provider.senders, user.tenant_id, user.user_id),
                  key=lambda r: int(r["sender_id"]))
    return ok({"sender_lists": [sender_out(r) for r in recs]})


@router.post("/smtp-domain-sender-add", summary="Add a sender address on one of the tenant's domains",
             responses=errors(401, 403, 404, 422, 503))
async def sender_add(body: SenderAddIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    domain = tenant_domain(request, user, body.domain_name)
    email = body.from_email.strip().lower()
    if not valid_email(email):
        raise ProviderError(422, "The from email must be a valid email address.")
    if email_domain(email) != domain["name"]:
        raise ProviderError(422, "The from email must belong to the domain.")
    sender_name = body.sender_name.strip() if body.sender_name and body.sender_name.strip() else None
    if sender_name and ("\r" in sender_name or "\n" in sender_name):
        raise ProviderError(422, "The sender name may not contain line breaks.")

    def taken() -> bool:
        return any(r["from_email"] == email and r["domain_name"] == domain["name"]
                   for r in tenant_senders(st, user.tenant_id))

    if taken():
        raise ProviderError(422, "The from email has already been taken.")
    sender_id = await next_id(st, "sender", user.tenant_id, user.actor)
    rec = {"sender_id": sender_id, "tenant_id": user.tenant_id, "user_id": user.user_id,
           "domain_name": domain["name"], "sender_name": sender_name, "from_email": email, "verified": False,
           "created_ts": now_ms(), "verified_ts": None}

    def build() -> ConfigWrite:
        if taken():
            raise ProviderError(422, "The from email has already been taken.")
        return ConfigWrite("provider.sender.add", user.tenant_id, user.actor, "POST /api/v1/smtp-domain-sender-add",
                           "ProviderSender", rec,
                           [ConfigRecord(CONFIG_PROVIDER_SENDERS, f"{user.tenant_id}/{sender_id}", "ProviderSender",
                                         rec)])

    await write_fenced(st, await st.writer.shard_of(user.tenant_id), st.provider.senders.catch_up, build)
    return ok({"sender": sender_out(rec)})


@router.post("/smtp-domain-sender-verify", summary="Mail a verification link to the sender address",
             responses=errors(401, 403, 404, 422, 503))
async def sender_verify(body: SenderVerifyIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    rec = user_sender(st, user, body.from_email)
    if rec is None:
        raise ProviderError(404, "The sender was not found.")
    if rec["verified"]:
        return ok({"success": True, "message": "Sender already verified", "sender": sender_out(rec)})
    expires = int(time.time()) + st.settings.provider_sender_link_ttl_s
    token = signed_links.sign(_link_key(st), signed_links.Link(
        rec["tenant_id"], f"{_LINK_PREFIX}{rec['sender_id']}:{rec['from_email']}", "", None, expires))
    link = f"{_base_url(st)}/api/v1/smtp-sender-confirm?token={quote(token)}"
    html = (f"<p>Please confirm that <b>{escape(rec['from_email'])}</b> may be used as a sender.</p>"
            f'<p><a href="{escape(link)}">Verify this sender</a></p>'
            f"<p>The link expires in {st.settings.provider_sender_link_ttl_s // 3600 or 1} hour(s).</p>")
    text = f"Confirm that {rec['from_email']} may be used as a sender: {link}\n"
    await system_mail.send(st, user, "sender-verification", "POST /api/v1/smtp-domain-sender-verify",
                           rec["from_email"], "Verify your sender address", html, text)
    return ok({"success": True, "message": "Verification Email Sent Successfully"})


@router.get("/smtp-sender-confirm", summary="Follow a sender verification link (public: the link is the credential)",
            responses=errors(404, 410, 422))
async def sender_confirm(request: Request, token: str = Query(..., max_length=signed_links.MAX_TOKEN_LEN)) -> Any:
    st = state_of(request)
    try:
        link = signed_links.verify(_link_key(st), token)
    except signed_links.ExpiredLink:
        raise ProviderError(410, "The verification link has expired; ask for a new one.") from None
    except signed_links.InvalidLink:
        raise ProviderError(404, "The verification link is not valid.") from None
    sender_id, _, email = link.url.removeprefix(_LINK_PREFIX).partition(":")
    if not link.url.startswith(_LINK_PREFIX) or not sender_id.isdigit():
        raise ProviderError(404, "The verification link is not valid.")
    await st.provider.senders.catch_up()
    key = f"{link.tenant_id}/{sender_id}"
    rec = st.provider.senders.get(key)
    if rec is None or rec["from_email"] != email or rec["tenant_id"] != link.tenant_id:
        raise ProviderError(404, "The verification link is not valid.")
    if not rec["verified"]:
        new = {**rec, "verified": True, "verified_ts": now_ms()}
        owner = ProviderUser(int(rec["user_id"]), rec["tenant_id"], "", "")
        await write(st, owner, "provider.sender.verified", "GET /api/v1/smtp-sender-confirm", "ProviderSender", new,
                    [ConfigRecord(CONFIG_PROVIDER_SENDERS, key, "ProviderSender", new)])
        rec = new
    return ok({"success": True, "message": "Sender Verified Successfully", "sender": sender_out(rec)})
