"""Provider domains: ``smtp-domain-add``, ``-list``, ``-view``, ``-verify`` (PRODUCT.md section 6).

A provider domain IS the outbound domain API's record (``postbus.config.domains``, one ledger, one
verification state): this module only reuses routes_domains' helpers. ``smtp-domain-add`` registers
the name for the token user's tenant with one RSA-2048 DKIM key under selector ``smtp``
(``smtp._domainkey.<domain>``) and a verification token (TXT ``<prefix>.<domain>``). A name held by
any other tenant, verified or not, is refused: "The domain name has already been taken."; the
tenant's own record registered through the outbound API is adopted (it gets the ``smtp`` key if
it has no key yet, else keeps its signing key). Domains are the tenant's: every user of the tenant
sees them. ``id`` is a stable integer derived from the name (records carry no integer id)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from fastapi import Depends, Query, Request
from pydantic import BaseModel, Field

from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.provider.auth import ProviderUser, checked_user
from services.api.provider.common import iso
from services.api.provider.envelope import ProviderError, errors, ok, provider_router
from services.api.routes_domains import _domain_name, _new_record, _runtime, _save
from services.common import dns_check
from services.common import domain_quota as q
from services.common.dkim_keys import generate_dkim_key, verification_token

router = provider_router(prefix="/api/v1", tags=["provider"])
SELECTOR = "smtp"
TAKEN = "The domain name has already been taken."


class DomainAddIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    domain_name: str = Field(..., max_length=253)


def domain_id(name: str) -> int:
    """A stable positive integer for a domain name (48 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "big")


def public_key_value(public_key_b64: str) -> str:
    return f"v=DKIM1; h=sha256; k=rsa; p={public_key_b64}"


def domain_out(rec: dict[str, Any]) -> dict[str, Any]:
    selector = rec.get("dkim_selector")
    return {"id": domain_id(rec["name"]), "domain_name": rec["name"],
            "host": f"{selector}._domainkey.{rec['name']}" if selector else None,
            "selector": selector,
            "public_key": public_key_value(rec["dkim_public_key"]) if rec.get("dkim_public_key") else None,
            "verified": bool(rec.get("verified")), "status": rec.get("status", "active"),
            "verification_status": rec.get("verification_status"), "dkim_status": rec.get("dkim_status"),
            "created_at": iso(rec.get("created_ts")), "updated_at": iso(rec.get("updated_ts"))}


def dns_records(prefix: str, rec: dict[str, Any]) -> list[dict[str, str]]:
    """What to publish: the verification TXT, the signing DKIM key, the outbound API's standby keys."""
    out = []
    if rec.get("verification_token"):
        out.append({"type": "TXT", "host": f"{prefix}.{rec['name']}", "value": rec["verification_token"]})
    if rec.get("dkim_public_key"):
        out.append({"type": "TXT", "host": f"{rec['dkim_selector']}._domainkey.{rec['name']}",
                    "value": public_key_value(rec["dkim_public_key"])})
    out += [{"type": "TXT", "host": f"{k['selector']}._domainkey.{rec['name']}",
             "value": public_key_value(k["public_key"])} for k in rec.get("dkim_standby") or []]
    return out


def normalized(name: str | None) -> str:
    if not name or not str(name).strip():
        raise ProviderError(422, "The domain name field is required.")
    try:
        return _domain_name(str(name))
    except ApiError:
        raise ProviderError(422, "The domain name format is invalid.") from None


def tenant_domain(request: Request, user: ProviderUser, name: str | None) -> dict[str, Any]:
    """The tenant's domain ``name`` (404 for an unknown name or another tenant's)."""
    norm = normalized(name)
    rec = _runtime(request).domains.get(norm)
    if rec is None or rec["tenant_id"] != user.tenant_id:
        raise ProviderError(404, "The domain was not found.")
    return rec


@router.post("/smtp-domain-add", summary="Add a sending domain (DKIM key, selector smtp)",
             responses=errors(401, 403, 422, 503))
async def domain_add(body: DomainAddIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st, rt = state_of(request), _runtime(request)
    name = normalized(body.domain_name)

    def taken(existing: dict[str, Any] | None) -> bool:
        return existing is not None and (existing["tenant_id"] != user.tenant_id
                                         or existing.get("dkim_selector") == SELECTOR)

    if taken(rt.domains.get(name)):  # refused before the key is made; checked again below
        raise ProviderError(422, TAKEN)
    key = await asyncio.to_thread(generate_dkim_key, SELECTOR)
    async with rt.claims:  # decided on the caught-up view, then written (as the outbound API does)
        await rt.domains.catch_up()
        existing = rt.domains.get(name)
        if taken(existing):
            raise ProviderError(422, TAKEN)
        if existing is None:
            rec = _new_record(st, user.actor, name, None)
            ctype = "domain.update"  # a new domain's first command creates its ledger entry
        else:
            rec = dict(existing)
            ctype = "domain.verify"
        if not rec.get("dkim_public_key"):
            rec.update(dkim_selector=SELECTOR, dkim_public_key=key.public_key_b64,
                       dkim_private_key_enc=st.box.encrypt(key.private_key_pem), dkim_standby=[],
                       dkim_status=dns_check.PENDING)
        if not rec.get("verification_token"):
            rec.update(verification_token=verification_token(), verification_status=dns_check.PENDING)
        rec["updated_ts"] = q.now_ms()
        await _save(st, rt, user.actor, ctype, "POST /api/v1/smtp-domain-add", rec)
    return ok({"success": True, "domain": {k: v for k, v in domain_out(rec).items()
                                           if k in ("id", "domain_name", "host", "selector", "public_key")}})


@router.get("/smtp-domain-list", summary="List the tenant's sending domains", responses=errors(401, 403, 422))
async def domain_list(request: Request, user_id: int | None = Query(None),
                      user: ProviderUser = Depends(checked_user)) -> Any:
    rt = _runtime(request)
    recs = sorted((r for r in list(rt.domains.items.values()) if r["tenant_id"] == user.tenant_id),
                  key=lambda r: r["name"])
    return ok({"domains": [domain_out(r) for r in recs]})


@router.get("/smtp-domain-view", summary="View a domain and the DNS records to publish",
            responses=errors(401, 403, 404, 422))
async def domain_view(request: Request, user_id: int | None = Query(None), domain_name: str | None = Query(None),
                      user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    rec = tenant_domain(request, user, domain_name)
    return ok({"domain": domain_out(rec), "dns_records": dns_records(st.settings.domain_verification_prefix, rec)})


@router.get("/smtp-domain-verify", summary="Check the domain's DNS records", responses=errors(401, 403, 404, 422))
async def domain_verify(request: Request, user_id: int | None = Query(None), domain_name: str | None = Query(None),
                        user: ProviderUser = Depends(checked_user)) -> Any:
    st, rt = state_of(request), _runtime(request)
    rec = tenant_domain(request, user, domain_name)
    if not rec.get("verification_token") or not rec.get("dkim_public_key"):
        raise ProviderError(422, "The domain has no DNS records yet: add it with smtp-domain-add first.")
    resolver = dns_check.make_resolver(st.settings.dns_resolvers, st.settings.dns_timeout_s)
    prefix = st.settings.domain_verification_prefix
    vstatus, signing, standby = await dns_check.check_domain_records(resolver, prefix, rec)
    dstatus = dns_check.combined([signing, *(k["status"] for k in standby)])
    verified = bool(rec["verified"]) or (vstatus == dstatus == dns_check.SUCCESS)
    new = {**rec, "verification_status": vstatus, "dkim_status": dstatus, "verified": verified,
           "dkim_standby": standby}
    if any(new[k] != rec.get(k) for k in new):
        new["updated_ts"] = q.now_ms()
        await _save(st, rt, user.actor, "domain.verification", "GET /api/v1/smtp-domain-verify", new)
    if verified:
        return ok({"success": True, "message": "Verified Successfully"})
    problems = []
    for host, status, what in ((f"{prefix}.{rec['name']}", vstatus, "verification TXT record"),
                               (f"{rec['dkim_selector']}._domainkey.{rec['name']}", signing, "DKIM record"),
                               *((f"{k['selector']}._domainkey.{rec['name']}", k["status"], "DKIM record")
                                 for k in standby)):
        if status == dns_check.PENDING:
            problems.append(f"The {what} {host} is missing.")
        elif status == dns_check.FAILED:
            problems.append(f"The {what} {host} has a wrong value.")
        elif status == dns_check.TEMPORARY:
            problems.append(f"The {what} {host} could not be checked (DNS did not answer); try again.")
    raise ProviderError(422, *(problems or ["The domain is not verified."]))
