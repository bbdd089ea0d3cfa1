"""Mail Postbus itself sends for the provider API (sender verification, welcome mail) through the
operator's system SMTP account (settings ``system_smtp_*``; ``make up`` points it at its local sink).

The API does no SMTP: it appends a ``system_mail.send`` command (schema ``SystemMail``) and answers;
the sender sends it (services/sender/system_mail.py). The bodies travel encrypted: a verification
link is a credential, and the command log is kept forever and exported."""

from __future__ import annotations

import uuid

from services.api.provider.auth import ProviderUser
from services.api.provider.envelope import ProviderError
from services.api.state import ApiState
from services.common.settings import Settings


def configured(settings: Settings) -> bool:
    return bool(settings.system_smtp_host)


def _clean_header(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ProviderError(422, "Header values may not contain line breaks.")
    return value


async def send(st: ApiState, user: ProviderUser, kind: str, route: str, to: str, subject: str, html: str,
               text: str | None = None, from_name: str | None = None) -> str:
    """Queue one system mail (503 in the provider shape when no system account is configured);
    returns its id."""
    if not configured(st.settings):
        raise ProviderError(503, "The system mail account is not configured; ask the operator.")
    mail_id = uuid.uuid4().hex
    payload = {"tenant_id": user.tenant_id, "user_id": user.user_id, "kind": kind, "mail_id": mail_id,
               "to": _clean_header(to), "subject": _clean_header(subject),
               "from_name": _clean_header(from_name) if from_name else None,
               "html_enc": st.box.encrypt(html) or st.box.encrypt(" "), "text_enc": st.box.encrypt(text)}
    await st.writer.append("system_mail.send", user.tenant_id, user.actor, route, "SystemMail", payload)
    return mail_id
