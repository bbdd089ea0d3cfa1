"""``ses-verify`` / ``ses-status`` with the SES backend (``POSTBUS_DOMAIN_BACKEND=ses``).

SES holds the verification material (its TXT token and DKIM tokens; SES signs with its own keys),
so the domain record keeps only SES's TXT token and the last statuses seen. Writes go through the
same command path as the native backend (``save``: a command + the domain's config record)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.api.errors import ApiError
from services.common import domain_quota as q
from services.common import ses_backend as ses
from services.common.settings import Settings

Save = Callable[[str, str, dict[str, Any]], Awaitable[None]]  # (command type, route, record)


def _backend(settings: Settings) -> ses.SesBackend:
    return ses.backend_for(settings.ses_region, settings.ses_endpoint_url, settings.ses_timeout_s)


async def verify(settings: Settings, rec: dict[str, Any], created: bool, save: Save) -> dict[str, Any]:
    """SES first (nothing is recorded when it fails), then the record, then the seed's answer."""
    try:
        v = await _backend(settings).verify(rec["name"])
    except ses.SesUnavailable as exc:
        raise ApiError(exc.status, "ses_unavailable", str(exc)) from None
    new = dict(rec, verification_token=v.verification_token)
    if not rec["verified"]:
        new.update(verification_status=ses.PENDING, dkim_status=ses.PENDING)
    if created or any(new[k] != rec.get(k) for k in new):
        new["updated_ts"] = q.now_ms()
        # a new domain's first command must be domain.update: it creates the ledger entry
        await save("domain.update" if created else "domain.verify", "POST /domains/{name}/ses-verify", new)
    return {"name": rec["name"], "ses_verification_token": v.verification_token, "ses_dkim_tokens": v.dkim_tokens,
            "ses_verified": bool(new["verified"]), "dns_records": ses.dns_records(rec["name"], v)}


async def status(settings: Settings, rec: dict[str, Any], save: Save) -> dict[str, Any]:
    """SES's statuses; both ``Success`` -> the domain is marked verified (it stays verified)."""
    if not rec.get("verification_token"):  # no ses-verify yet: SES has nothing to say about it
        return {"name": rec["name"], "ses_verified": rec["verified"], "verification_status": ses.NOT_STARTED,
                "dkim_status": ses.NOT_STARTED}
    try:
        s = await _backend(settings).status(rec["name"])
    except ses.SesUnavailable as exc:
        raise ApiError(exc.status, "ses_unavailable", str(exc)) from None
    verified = bool(rec["verified"]) or (s.verification_status == s.dkim_status == ses.SUCCESS)
    new = {**rec, "verified": verified, "verification_status": s.verification_status, "dkim_status": s.dkim_status}
    if any(new[k] != rec.get(k) for k in new):
        new["updated_ts"] = q.now_ms()
        await save("domain.verification", "GET /domains/{name}/ses-status", new)
    return {"name": rec["name"], "ses_verified": verified, "verification_status": s.verification_status,
            "dkim_status": s.dkim_status}
