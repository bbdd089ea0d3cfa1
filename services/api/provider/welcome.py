"""``POST /api/v1/smtp-welcome-mail`` {from_email, shop_name, subject?, html_content?}: a welcome mail
to ``from_email`` (the recipient, as the seed names it) through the operator's system SMTP account.

Without ``subject``: the built-in ``welcome`` template (``smtp-template-default``) rendered with
``shop_name``. With ``subject``, ``html_content`` is required and is the body (rendered in the same
sandbox, so ``{{ shop_name }}`` works; values are HTML-escaped). The route needs a token and
``user_id`` like every other ``/api/v1`` route: without one it would let anyone mail any address
through the operator's account."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from pydantic import BaseModel, Field

from services.api.deps import state_of
from services.api.provider import system_mail
from services.api.provider.auth import ProviderUser, checked_user
from services.api.provider.common import valid_email
from services.api.provider.default_templates import WELCOME, by_key
from services.api.provider.envelope import ProviderError, errors, ok, provider_router
from services.common.templating import MAX_SOURCE_CHARS, TemplateError, render, render_text

router = provider_router(prefix="/api/v1", tags=["provider"])


class WelcomeIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    from_email: str = Field(..., max_length=254, description="the recipient")
    shop_name: str = Field(..., min_length=1, max_length=200)
    subject: str | None = Field(None, max_length=998)
    html_content: str | None = Field(None, max_length=MAX_SOURCE_CHARS)


@router.post("/smtp-welcome-mail", summary="Send a welcome mail through the system SMTP account",
             responses=errors(401, 403, 422, 503))
async def welcome_mail(body: WelcomeIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    to = body.from_email.strip()
    if not valid_email(to):
        raise ProviderError(422, "The from email must be a valid email address.")
    if body.subject is not None and not body.html_content:
        raise ProviderError(422, "The html content field is required when subject is present.")
    context = {"shop_name": body.shop_name.strip(), "email": to, "name": None}
    tpl = by_key(WELCOME)
    try:
        html = render(body.html_content if body.html_content else tpl["html_body"], context)
        # the subject is a header, not HTML: rendered without escaping, refused with line breaks
        subject = body.subject if body.subject is not None else render_text(tpl["subject"], context)
    except TemplateError as exc:
        raise ProviderError(422, f"The html content is not a valid template: {exc}.") from None
    await system_mail.send(st, user, "welcome", "POST /api/v1/smtp-welcome-mail", to, subject, html,
                           from_name=body.shop_name.strip())
    return ok({"success": True, "message": "Welcome Mail Sent Successfully"})
