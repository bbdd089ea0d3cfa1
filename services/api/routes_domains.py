"""Outbound domain API (seed: outbound-email-domain-api): limits, exact counters, native verification.

A domain belongs to the tenant that registers it (``PUT /domains/{name}/outbound`` with its key;
the admin names ``tenant_id``). Its config is a ``Domain`` record on ``postbus.config.domains``
written with its command; counters live in the sender's outbound ledger, which applies the
``domain.*`` commands in partition order and answers on ``postbus.domain.results``. Another
tenant's domain is answered 404, as if it did not exist, except where a registration meets it.

Ownership (``domain_quota.claim_state``): a verified domain is its tenant's for good (another
tenant's registration: 409 ``sender_domain_not_owned``); an unverified registration is a claim
that blocks other registrations (409 ``domain_claim_pending``) for
``POSTBUS_DOMAIN_CLAIM_EXPIRY_HOURS`` and is then taken over by the next tenant that registers the
name. Before that, another tenant may prove DNS control (native backend): its ``ses-verify`` answers
a challenge token of its own, and its ``ses-status`` finding that token in DNS releases the claim
to it. A takeover is a ``domain.update`` naming ``replaces_tenant``; the ledger moves the domain's
entry to the new tenant."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka.errors import KafkaError
from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, Field

from services.api import domains_ses, field_policy
from services.api.auth import authenticate, require_admin, scope_tenant
from services.api.commands import Actor, CommandWriter, ConfigRecord
from services.api.deps import state_of
from services.api.domain_runtime import DomainRuntime
from services.api.errors import ApiError
from services.api.state import ApiState
from services.common import dns_check
from services.common import domain_quota as q
from services.common.dkim_keys import DkimKey, dkim_txt_value, generate_dkim_key, new_selector, verification_token
from services.common.topics import COMMANDS, CONFIG_DOMAINS


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = DomainRuntime.build(app.state.postbus.settings)
    await runtime.start()
    app.state.postbus_domains = runtime
    try:
        yield
    finally:
        await runtime.stop()


router = APIRouter(tags=["outbound domains"], lifespan=_lifespan)
log = logging.getLogger("postbus.api.domains")

_NAME = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid_domain, missing_tenant_id"},
    401: {"description": "missing/invalid token, or tenant_mismatch"},
    403: {"description": "admin_only_field: a tenant key naming limits, tier, enforcement or status"},
    404: {"description": "domain_not_found (also for another tenant's domain), tenant_not_found"},
    409: {"description": "registering a name another tenant holds: sender_domain_not_owned (verified by it), "
                         "domain_claim_pending (its unverified claim has not expired yet)"},
    503: {"description": "ledger_unavailable (the outbound ledger did not answer in time), log_unavailable"},
}
_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing/invalid token"},
    403: {"description": "admin_required: needs the master (admin) token"},
    503: {"description": "ledger_unavailable"},
}


class SuspensionEvidenceOut(BaseModel):
    reason: Literal["bounce_rate_exceeded"]
    window: str = Field(..., description="the counting window, e.g. 'month 2026-05'")
    sent_count: int
    bounce_count: int
    complaint_count: int
    bounce_rate: float = Field(..., description="percent of the window's sent mail")
    threshold: float = Field(..., description="percent (POSTBUS_DOMAIN_SUSPEND_BOUNCE_RATE)")
    min_volume: int = Field(..., description="sent mail needed first (POSTBUS_DOMAIN_SUSPEND_MIN_SENT)")
    suspended_ts: int = Field(..., description="epoch milliseconds")


class OutboundOut(BaseModel):
    name: str = Field(..., description="Domain name")
    outbound_tier: Literal["shared", "dedicated"]
    outbound_status: Literal["active", "suspended"]
    outbound_daily_limit: int = Field(..., description="Max emails/day (0 = unlimited)")
    outbound_monthly_limit: int = Field(..., description="Max emails/month (0 = unlimited)")
    outbound_sent_today: int = Field(..., description="Emails sent today (UTC)")
    outbound_sent_month: int = Field(..., description="Emails sent this month (UTC)")
    outbound_enforcement: Literal["soft", "hard"] = Field(..., description="soft (allow + bill) or hard (reject)")
    bounce_count: int = Field(..., description="Bounces this period")
    complaint_count: int = Field(..., description="Complaints this period")
    bounce_rate: float = Field(..., description="Bounce rate (%) of this month's sent mail")
    complaint_rate: float = Field(..., description="Complaint rate (%) of this month's sent mail")
    ses_verified: bool = Field(..., description="Whether the domain's verification and DKIM records are verified")
    suspension_evidence: SuspensionEvidenceOut | None = Field(
        None, description="set while the domain is suspended automatically for its bounce rate (null otherwise)")


class OutboundUpdate(BaseModel):
    outbound_daily_limit: int | None = Field(None, ge=0, le=2**62, description="Max emails/day (0 = unlimited)")
    outbound_monthly_limit: int | None = Field(None, ge=0, le=2**62, description="Max emails/month (0 = unlimited)")
    outbound_tier: Literal["shared", "dedicated"] | None = None
    outbound_enforcement: Literal["soft", "hard"] | None = None
    outbound_status: Literal["active", "suspended"] | None = None
    tenant_id: str | None = Field(None, description="owner when the admin registers a new domain")


class IncrementIn(BaseModel):
    idempotency_key: str | None = Field(
        None, description="same as the Idempotency-Key header: a retry with the same key within "
                          "POSTBUS_DOMAIN_IDEMPOTENCY_WINDOW_S (1 h) counts nothing and gets the first answer")
    message_id: str | None = Field(
        None, description="same as the X-Postbus-Message-Id header: the id of a message Postbus sent; it is "
                          "counted once, by Postbus's own send or by this call, whichever comes first")


class IncrementOut(BaseModel):
    name: str
    outbound_sent_today: int = Field(..., description="Updated daily counter")
    outbound_sent_month: int = Field(..., description="Updated monthly counter")
    allowed: bool = Field(..., description="Whether the email is allowed")
    reason: str | None = Field(None, description="outbound_suspended[_soft], daily_limit_exceeded[_soft], "
                                                 "monthly_limit_exceeded[_soft]; null when within limits")


class DnsRecord(BaseModel):
    type: Literal["TXT", "CNAME"]
    name: str
    value: str


class SesVerifyOut(BaseModel):
    name: str
    ses_verification_token: str = Field(..., description="TXT record value for the verification record")
    ses_dkim_tokens: list[str] = Field(
        ..., description="the 3 DKIM selectors (native backend: each a TXT record <selector>._domainkey.<domain> "
                         "holding its own RSA key, listed in dns_records; ses backend: SES's CNAME tokens). The "
                         "first is the signing key")
    ses_verified: bool
    dns_records: list[DnsRecord]


class SesStatusOut(BaseModel):
    name: str
    ses_verified: bool
    verification_status: Literal["Pending", "Success", "Failed", "TemporaryFailure", "NotStarted"]
    dkim_status: Literal["Pending", "Success", "Failed", "TemporaryFailure", "NotStarted"]


class DkimOut(BaseModel):
    name: str
    selector: str | None = Field(..., description="the selector mail is signed with")
    next_selector: str | None = Field(..., description="rotation: the new selector, until its record verifies")
    next_status: Literal["Pending", "Success", "Failed", "TemporaryFailure", "NotStarted"]
    retired_selectors: list[str] = Field(..., description="selectors switched away from (their records may go)")
    standby_selectors: list[str] = Field(
        [], description="the other two of the three DKIM keys ses-verify hands out: published, not signing")
    dns_records: list[DnsRecord] = Field(..., description="the records to publish now")


class ResetDailyOut(BaseModel):
    reset_count: int = Field(..., description="Number of domains reset")


class FrozenOut(BaseModel):
    name: str
    partner_ref: str = Field(..., description="the owning tenant id")
    outbound_sent_month: int
    outbound_monthly_limit: int
    bounce_count: int
    complaint_count: int
    bounce_rate: float
    complaint_rate: float


class ResetMonthlyOut(BaseModel):
    frozen: list[FrozenOut] = Field(..., description="Per-domain frozen values before reset")
    reset_count: int = Field(..., description="Number of domains reset")


# --- helpers ---------------------------------------------------------------------------------------

def _runtime(request: Request) -> DomainRuntime:
    return request.app.state.postbus_domains  # type: ignore[no-any-return]


def _domain_name(name: str) -> str:
    norm = name.strip().rstrip(".").lower()
    if not _NAME.match(norm):
        raise ApiError(400, "invalid_domain", "not a valid domain name")
    return norm


def _owned(actor: Actor, rt: DomainRuntime, name: str) -> dict[str, Any]:
    rec = rt.domains.get(name)
    if rec is None or (actor.kind != "admin" and rec["tenant_id"] != actor.tenant_id):
        raise ApiError(404, "domain_not_found", f"domain {name!r} is not registered")
    return rec


def _new_record(st: ApiState, actor: Actor, name: str, tenant_id: str | None) -> dict[str, Any]:
    """The default record of a domain a caller registers (a tenant key: for its own tenant)."""
    tid = scope_tenant(actor, tenant_id)
    if not tid:
        raise ApiError(400, "missing_tenant_id", "tenant_id is required to register a domain with the admin token")
    if st.tenants.get(tid) is None:
        raise ApiError(404, "tenant_not_found", f"tenant {tid!r} does not exist")
    now = q.now_ms()
    return {"name": name, "tenant_id": tid, "tier": "shared", "status": "active", "daily_limit": 0,
            "monthly_limit": 0, "enforcement": "soft", "verification_token": None, "dkim_selector": None,
            "dkim_public_key": None, "dkim_private_key_enc": None, "verified": False,
            "verification_status": dns_check.NOT_STARTED, "dkim_status": dns_check.NOT_STARTED,
            "created_ts": now, "updated_ts": now, "dkim_next_selector": None, "dkim_next_public_key": None,
            "dkim_next_private_key_enc": None, "dkim_next_status": dns_check.NOT_STARTED, "dkim_retired_selectors": [],
            "dkim_standby": []}


def _claimant(st: ApiState, actor: Actor, existing: dict[str, Any] | None, tenant_id: str | None) -> str | None:
    """The tenant a registration of an already registered name is for, when that is not the
    record's own tenant (None: the owner's own update, or the admin acting on it)."""
    if existing is None:
        return None
    if actor.kind == "tenant":
        tid = scope_tenant(actor, tenant_id)  # a tenant key naming another tenant: 401 tenant_mismatch
    else:
        tid = tenant_id or existing["tenant_id"]
        if tid != existing["tenant_id"] and st.tenants.get(tid) is None:
            raise ApiError(404, "tenant_not_found", f"tenant {tid!r} does not exist")
    return tid if tid != existing["tenant_id"] else None


def _taken_over(st: ApiState, existing: dict[str, Any], tenant_id: str) -> str:
    """Another tenant registering ``existing``'s name: refused while the name is verified by its
    tenant or its unverified claim is live; an expired claim is released (returns its tenant)."""
    expiry_ms = _expiry_ms(st)
    state = q.claim_state(existing, tenant_id, q.now_ms(), expiry_ms)
    if state == q.VERIFIED_OTHER:
        raise ApiError(409, q.NOT_OWNED, f"domain {existing['name']!r} is verified by another tenant")
    if state == q.PENDING_OTHER:
        until = datetime.fromtimestamp(q.claim_expires_ms(existing, expiry_ms) / 1000, tz=UTC)
        raise ApiError(409, "domain_claim_pending",
                       f"domain {existing['name']!r} is claimed by another tenant and not verified; the claim "
                       f"expires at {until.isoformat(timespec='seconds')}, or prove control of its DNS first: "
                       f"POST /domains/{{name}}/ses-verify, publish the TXT record, GET /domains/{{name}}/ses-status")
    return str(existing["tenant_id"])


def _challenge_token(st: ApiState, tenant_id: str, name: str) -> str:
    """The verification token another tenant publishes to take over an unverified claim: its own
    (the claim holder's token proves nothing about it), stable without being stored."""
    mac = hmac.new(st.pepper, f"postbus-domain-claim\0{tenant_id}\0{name}".encode(), hashlib.sha256)
    return "pbclaim-" + mac.hexdigest()[:40]


async def _save(st: ApiState, rt: DomainRuntime, actor: Actor, ctype: str, route: str, rec: dict[str, Any],
                replaces: str | None = None) -> None:
    """The command and the domain's new record in one transaction; returns once readable here.
    ``replaces``: the tenant whose unverified claim this registration takes over."""
    payload = {"request_id": uuid.uuid4().hex, "name": rec["name"], "tenant_id": rec["tenant_id"],
               "status": rec["status"], "daily_limit": rec["daily_limit"], "monthly_limit": rec["monthly_limit"],
               "enforcement": rec["enforcement"], "verified": bool(rec["verified"]), "replaces_tenant": replaces}
    try:
        offsets = await st.writer.append_config(ctype, rec["tenant_id"], actor, route, "DomainCommand", payload,
                                                [ConfigRecord(CONFIG_DOMAINS, rec["name"], "Domain", rec)])
        await rt.domains.wait_for(offsets[CONFIG_DOMAINS], st.settings.write_timeout_s)
    except (KafkaError, TimeoutError) as exc:
        raise ApiError(503, "log_unavailable", f"the event log did not take the write in time: {type(exc).__name__}"
                       ) from None


async def _wait_status(st: ApiState, rt: DomainRuntime, offset: int) -> None:
    """Read-your-writes for GET after an increment/reset: the ledger's snapshot is applied here."""
    if offset >= 0:
        try:
            await rt.status.wait_for({0: offset}, st.settings.write_timeout_s)
        except TimeoutError:
            pass  # the answer itself is exact; a GET may briefly show the previous snapshot


def _outbound(rt: DomainRuntime, rec: dict[str, Any]) -> dict[str, Any]:
    status = rt.status.get(rec["name"])
    if status is not None and status["tenant_id"] != rec["tenant_id"]:
        status = None
    c = q.counters_at(status, q.now_ms())
    evidence = (status or {}).get("suspension_evidence")
    return {
        "name": rec["name"], "outbound_tier": rec["tier"], "outbound_status": _ledger_status(status, rec),
        "outbound_daily_limit": rec["daily_limit"], "outbound_monthly_limit": rec["monthly_limit"],
        "outbound_sent_today": c["sent_today"], "outbound_sent_month": c["sent_month"],
        "outbound_enforcement": rec["enforcement"], "bounce_count": c["bounce_count"],
        "complaint_count": c["complaint_count"], "bounce_rate": q.rate(c["bounce_count"], c["sent_month"]),
        "complaint_rate": q.rate(c["complaint_count"], c["sent_month"]), "ses_verified": rec["verified"],
        "suspension_evidence": evidence,
    }


def _ledger_status(status: dict[str, Any] | None, rec: dict[str, Any]) -> str:
    """The ledger enforces the status (it may have suspended the domain itself); a snapshot older
    than the record's last update does not know that update yet."""
    if status and status.get("status") and status.get("updated_ts", 0) >= rec.get("updated_ts", 0):
        return str(status["status"])
    return str(rec["status"])


async def _ledger_results(st: ApiState, rt: DomainRuntime, request_id: str, count: int,
                          send: Any) -> list[dict[str, Any]]:
    wait = rt.results.expect(request_id, count)
    try:
        try:
            await send()
        except KafkaError as exc:
            raise ApiError(503, "log_unavailable", f"the event log is unavailable: {type(exc).__name__}") from None
        try:
            await asyncio.wait_for(wait.done.wait(), st.settings.domain_result_timeout_s)
        except TimeoutError:
            raise ApiError(503, "ledger_unavailable", "the outbound ledger did not answer in time; the request "
                           "is queued and may still be applied (an increment: retry it with the same "
                           "Idempotency-Key to count it once)") from None
        return wait.results
    finally:
        rt.results.forget(request_id)


# --- routes ----------------------------------------------------------------------------------------

@router.get("/domains/{name}/outbound", response_model=OutboundOut, responses=_ERRORS,
            summary="Outbound configuration and counters of a domain")
async def get_outbound(name: str, request: Request) -> dict[str, Any]:
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    return _outbound(rt, _owned(actor, rt, _domain_name(name)))


@router.put("/domains/{name}/outbound", response_model=OutboundOut, responses=_ERRORS,
            summary="Update limits, tier, enforcement or status (registers an unknown domain)")
async def put_outbound(name: str, request: Request, body: OutboundUpdate | None = None) -> dict[str, Any]:
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    name = _domain_name(name)
    body = body or OutboundUpdate()
    field_policy.check_write("domain", actor, body)  # limits, tier, enforcement, status: admin only
    async with rt.claims:  # decided on the view, then written: one registration at a time here
        existing = rt.domains.get(name)
        claimant = _claimant(st, actor, existing, body.tenant_id)  # another tenant than the record's
        replaces = _taken_over(st, existing, claimant) if existing is not None and claimant else None
        if existing is None or replaces is not None:
            rec = _new_record(st, actor, name, claimant or body.tenant_id)
        else:
            rec = dict(_owned(actor, rt, name))
            # an automatic suspension stays until a caller sets the status explicitly
            rec["status"] = _ledger_status(rt.status.get(name), rec)
        for field, key in (("outbound_daily_limit", "daily_limit"), ("outbound_monthly_limit", "monthly_limit"),
                           ("outbound_tier", "tier"), ("outbound_enforcement", "enforcement"),
                           ("outbound_status", "status")):
            value = getattr(body, field)
            if value is not None:
                rec[key] = value
        rec["updated_ts"] = q.now_ms()
        await _save(st, rt, actor, "domain.update", "PUT /domains/{name}/outbound", rec, replaces)
    return _outbound(rt, rec)


IDEMPOTENCY_HEADER, MESSAGE_ID_HEADER, REPLAYED_HEADER = "Idempotency-Key", "X-Postbus-Message-Id", \
    "Idempotent-Replayed"


def _increment_key(request: Request, header: str, field: str, value: str | None) -> str | None:
    """The header or the body field (both given: they must agree); 422 when not 1-255 printable
    characters."""
    given = request.headers.get(header)
    if given is not None and value is not None and given != value:
        raise ApiError(422, "idempotency_key_conflict", f"the {header} header and the body's {field} differ")
    key = given if given is not None else value
    if key is not None and not q.valid_key(key):
        raise ApiError(422, "invalid_idempotency_key", f"{header} / {field} must be 1-{q.MAX_KEY_LEN} printable "
                       "characters")
    return key


@router.post("/domains/{name}/outbound/increment", response_model=IncrementOut,
             responses={**_ERRORS, 422: {"description": "invalid_idempotency_key, idempotency_key_conflict"}},
             summary="Check quotas and count one outgoing email (atomic, exact under concurrency; idempotent "
                     "with an Idempotency-Key or X-Postbus-Message-Id)")
async def increment(name: str, request: Request, response: Response,
                    body: IncrementIn | None = None) -> dict[str, Any]:
    """Optional ``Idempotency-Key`` header (or ``idempotency_key``): a retry with the same key, e.g.
    after a 503 ``ledger_unavailable`` (the increment may have been applied), counts nothing and is
    answered with the first answer and the header ``Idempotent-Replayed: true``. Optional
    ``X-Postbus-Message-Id`` header (or ``message_id``): the message Postbus sent with that id is
    counted once in all, by its send or by this call (then it is also the idempotency key)."""
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    rec = _owned(actor, rt, _domain_name(name))
    body = body or IncrementIn()
    idempotency_key = _increment_key(request, IDEMPOTENCY_HEADER, "idempotency_key", body.idempotency_key)
    message_id = _increment_key(request, MESSAGE_ID_HEADER, "message_id", body.message_id)
    request_id = uuid.uuid4().hex
    payload = {"request_id": request_id, "name": rec["name"], "tenant_id": rec["tenant_id"],
               "idempotency_key": idempotency_key, "message_id": message_id}

    async def send() -> None:
        await st.writer.append("domain.increment", rec["tenant_id"], actor, "POST /domains/{name}/outbound/increment",
                               "DomainCommand", payload)

    (result,) = await _ledger_results(st, rt, request_id, 1, send)
    if not result["found"]:
        raise ApiError(404, "domain_not_found", f"domain {rec['name']!r} is not registered")
    await _wait_status(st, rt, result["status_offset"])
    if result.get("replayed"):
        response.headers[REPLAYED_HEADER] = "true"
    return {"name": rec["name"], "outbound_sent_today": result["sent_today"],
            "outbound_sent_month": result["sent_month"], "allowed": result["allowed"], "reason": result["reason"]}


async def _reset(request: Request, ctype: str, route: str) -> list[dict[str, Any]]:
    """One reset command per partition of the command log (the ledger is partitioned by tenant);
    returns every partition's answer."""
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    require_admin(actor)
    request_id = uuid.uuid4().hex
    partitions = sorted(await st.writer.producer.partitions_for(COMMANDS))

    async def send() -> None:
        futures = []
        for p in partitions:
            _, value = CommandWriter.envelope(ctype, None, actor, route, "DomainCommand", {"request_id": request_id})
            futures.append(await st.writer.producer.send(COMMANDS, value=value, key=b"", partition=p))
        await asyncio.gather(*futures)

    results = await _ledger_results(st, rt, request_id, len(partitions), send)
    await _wait_status(st, rt, max(r["status_offset"] for r in results))
    return results


@router.post("/outbound/reset-daily", response_model=ResetDailyOut, responses=_ADMIN_ERRORS,
             summary="Reset every domain's daily counter (master token)")
async def reset_daily(request: Request) -> dict[str, Any]:
    results = await _reset(request, "domain.reset_daily", "POST /outbound/reset-daily")
    return {"reset_count": sum(r["reset_count"] for r in results)}


@router.post("/outbound/reset-monthly", response_model=ResetMonthlyOut, responses=_ADMIN_ERRORS,
             summary="Freeze monthly counters for billing, then reset them (master token)")
async def reset_monthly(request: Request) -> dict[str, Any]:
    results = await _reset(request, "domain.reset_monthly", "POST /outbound/reset-monthly")
    frozen = sorted((f for r in results for f in r["frozen"]), key=lambda f: f["name"])
    return {"frozen": frozen, "reset_count": sum(r["reset_count"] for r in results)}


DKIM_KEYS = 3  # the seed's "3 DKIM tokens"


def _dkim_records(rec: dict[str, Any]) -> list[dict[str, str]]:
    """Native backend: one TXT record per DKIM key (the signing key, the two standby keys, a
    rotation's next key), ``v=DKIM1; k=rsa; p=...`` at ``<selector>._domainkey.<domain>``."""
    out = [{"type": "TXT", "name": f"{rec['dkim_selector']}._domainkey.{rec['name']}",
            "value": dkim_txt_value(rec["dkim_public_key"])}]
    out += [{"type": "TXT", "name": f"{k['selector']}._domainkey.{rec['name']}",
             "value": dkim_txt_value(k["public_key"])} for k in rec.get("dkim_standby") or []]
    if rec.get("dkim_next_selector"):
        out.append({"type": "TXT", "name": f"{rec['dkim_next_selector']}._domainkey.{rec['name']}",
                    "value": dkim_txt_value(rec["dkim_next_public_key"])})
    return out


def _dns_records(prefix: str, rec: dict[str, Any]) -> list[dict[str, str]]:
    return [{"type": "TXT", "name": f"{prefix}.{rec['name']}", "value": rec["verification_token"]},
            *_dkim_records(rec)]


def _selectors(rec: dict[str, Any]) -> list[str]:
    """ses_dkim_tokens: the signing selector, then the standby ones (three; one for a domain whose
    DKIM was verified before Postbus handed out three keys)."""
    return [rec["dkim_selector"], *(k["selector"] for k in rec.get("dkim_standby") or [])]


async def _new_keys(count: int, taken: set[str]) -> list[DkimKey]:
    selectors: list[str] = []
    while len(selectors) < count:
        sel = new_selector()
        if sel not in taken and sel not in selectors:
            selectors.append(sel)
    return list(await asyncio.gather(*(asyncio.to_thread(generate_dkim_key, sel) for sel in selectors)))


def _standby(st: ApiState, keys: list[DkimKey]) -> list[dict[str, Any]]:
    return [{"selector": k.selector, "public_key": k.public_key_b64,
             "private_key_enc": st.box.encrypt(k.private_key_pem), "status": dns_check.PENDING} for k in keys]


def _with_keys(st: ApiState, rec: dict[str, Any], keys: list[DkimKey]) -> None:
    """The signing key and the two standby keys of a domain starting verification (mutates ``rec``)."""
    rec.update(dkim_selector=keys[0].selector, dkim_public_key=keys[0].public_key_b64,
               dkim_private_key_enc=st.box.encrypt(keys[0].private_key_pem), dkim_standby=_standby(st, keys[1:]),
               dkim_status=dns_check.PENDING)


def _dkim_out(rec: dict[str, Any]) -> dict[str, Any]:
    return {"name": rec["name"], "selector": rec.get("dkim_selector"), "next_selector": rec.get("dkim_next_selector"),
            "next_status": rec.get("dkim_next_status") or dns_check.NOT_STARTED,
            "retired_selectors": list(rec.get("dkim_retired_selectors") or []),
            "standby_selectors": [k["selector"] for k in rec.get("dkim_standby") or []],
            "dns_records": _dkim_records(rec) if rec.get("dkim_public_key") else []}


_SES_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    502: {"description": "ses_unavailable: SES backend only, SES refused the request"},
    503: {"description": "ses_unavailable (SES backend: unreachable or throttled), log_unavailable"},
}


@router.post("/domains/{name}/ses-verify", response_model=SesVerifyOut, responses=_SES_ERRORS,
             summary="Start verification (native: a TXT token and an RSA-2048 DKIM key; ses: through Amazon "
                     "SES); returns the DNS records")
async def ses_verify(name: str, request: Request) -> dict[str, Any]:
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    name = _domain_name(name)
    async with rt.claims:  # may register the name: decided on the view, then written
        existing = rt.domains.get(name)
        if existing is None and actor.kind == "admin":
            raise ApiError(404, "domain_not_found", f"domain {name!r} is not registered")
        replaces = None
        if existing is not None and actor.kind == "tenant" and existing["tenant_id"] != actor.tenant_id:
            state = q.claim_state(existing, actor.tenant_id, q.now_ms(), _expiry_ms(st))
            if state == q.PENDING_OTHER and st.settings.domain_backend == "native":
                return _challenge_out(st, actor.tenant_id, name)  # nothing written until it is proved
            replaces = _taken_over(st, existing, actor.tenant_id)  # 409 unless the claim expired
        created = existing is None or replaces is not None
        rec = _new_record(st, actor, name, None) if created else dict(_owned(actor, rt, name))
        if st.settings.domain_backend == "ses":
            return await domains_ses.verify(st.settings, rec, created,
                                            lambda c, r, new: _save(st, rt, actor, c, r, new, replaces))
        if not (rec.get("verification_token") and rec.get("dkim_public_key")):
            _with_keys(st, rec, await _new_keys(DKIM_KEYS, set()))
            rec.update(verification_token=verification_token(), verification_status=dns_check.PENDING,
                       updated_ts=q.now_ms())
            # a new domain's first command must be domain.update: it creates the ledger entry
            ctype = "domain.update" if created else "domain.verify"
            await _save(st, rt, actor, ctype, "POST /domains/{name}/ses-verify", rec, replaces)
        elif len(rec.get("dkim_standby") or []) < DKIM_KEYS - 1 and not rec["verified"]:
            # a record from before the three keys, not verified yet: its two standby keys, to publish too
            # (a verified one keeps its one key: its mail stays signed without a new DNS change)
            have = list(rec.get("dkim_standby") or [])
            keys = await _new_keys(DKIM_KEYS - 1 - len(have), set(_selectors(rec)))
            rec.update(dkim_standby=have + _standby(st, keys), dkim_status=dns_check.PENDING, updated_ts=q.now_ms())
            await _save(st, rt, actor, "domain.verify", "POST /domains/{name}/ses-verify", rec)
    return {"name": name, "ses_verification_token": rec["verification_token"],
            "ses_dkim_tokens": _selectors(rec),
            "ses_verified": rec["verified"],
            "dns_records": _dns_records(st.settings.domain_verification_prefix, rec)}


@router.get("/domains/{name}/ses-status", response_model=SesStatusOut, responses=_SES_ERRORS,
            summary="Check verification (native: the published DNS records; ses: SES's statuses); marks "
                    "the domain verified once both succeed")
async def ses_status(name: str, request: Request) -> dict[str, Any]:
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    name = _domain_name(name)
    existing = rt.domains.get(name)
    if existing is not None and actor.kind == "tenant" and existing["tenant_id"] != actor.tenant_id:
        return await _challenge_status(st, rt, actor, existing)
    rec = _owned(actor, rt, name)
    if st.settings.domain_backend == "ses":
        return await domains_ses.status(st.settings, rec, lambda c, r, new: _save(st, rt, actor, c, r, new))
    if not rec.get("verification_token") or not rec.get("dkim_public_key"):
        return {"name": rec["name"], "ses_verified": rec["verified"], "verification_status": dns_check.NOT_STARTED,
                "dkim_status": dns_check.NOT_STARTED}
    # exactly what ses-verify told the client to publish: the TXT token and every DKIM key's TXT record
    resolver = dns_check.make_resolver(st.settings.dns_resolvers, st.settings.dns_timeout_s)
    prefix = st.settings.domain_verification_prefix
    vstatus, signing, standby = await dns_check.check_domain_records(resolver, prefix, rec)
    dstatus = dns_check.combined([signing, *(k["status"] for k in standby)])
    new = {**rec, "verification_status": vstatus, "dkim_status": dstatus, "dkim_standby": standby}
    if rec.get("dkim_next_selector"):
        await _check_rotation(resolver, new)
    verified = rec["verified"] or (vstatus == new["dkim_status"] == dns_check.SUCCESS)
    new["verified"] = verified
    if any(new[k] != rec.get(k) for k in new):
        new["updated_ts"] = q.now_ms()
        await _save(st, rt, actor, "domain.verification", "GET /domains/{name}/ses-status", new)
    return {"name": rec["name"], "ses_verified": verified, "verification_status": vstatus,
            "dkim_status": new["dkim_status"]}


def _expiry_ms(st: ApiState) -> int:
    return int(st.settings.domain_claim_expiry_hours * 3_600_000)


def _challenge_out(st: ApiState, tenant_id: str, name: str) -> dict[str, Any]:
    """ses-verify of a name another tenant claims (unverified): the TXT record that proves DNS
    control for this tenant. The DKIM key comes once the claim is released to it."""
    token = _challenge_token(st, tenant_id, name)
    return {"name": name, "ses_verification_token": token, "ses_dkim_tokens": [], "ses_verified": False,
            "dns_records": [{"type": "TXT", "name": f"{st.settings.domain_verification_prefix}.{name}",
                             "value": token}]}


async def _challenge_status(st: ApiState, rt: DomainRuntime, actor: Actor, existing: dict[str, Any]) -> dict[str, Any]:
    """ses-status of a name another tenant holds. Verified: 409 sender_domain_not_owned. Unverified
    (native backend): this tenant's challenge token found in DNS proves control, and the claim is
    released to it at once (a new record: the token verified, a DKIM key to publish next)."""
    name = existing["name"]
    if existing.get("verified"):
        raise ApiError(409, q.NOT_OWNED, f"domain {name!r} is verified by another tenant")
    if st.settings.domain_backend != "native":
        _taken_over(st, existing, str(actor.tenant_id))  # 409 while the claim is live
        raise ApiError(404, "domain_not_found", f"domain {name!r} is not registered by this tenant: register it")
    token = _challenge_token(st, str(actor.tenant_id), name)
    resolver = dns_check.make_resolver(st.settings.dns_resolvers, st.settings.dns_timeout_s)
    vstatus = await dns_check.check_token(resolver, f"{st.settings.domain_verification_prefix}.{name}", token)
    if vstatus != dns_check.SUCCESS:
        return {"name": name, "ses_verified": False, "verification_status": vstatus,
                "dkim_status": dns_check.NOT_STARTED}
    keys = await _new_keys(DKIM_KEYS, set())
    async with rt.claims:
        current = rt.domains.get(name)
        if current is not None and current["tenant_id"] == actor.tenant_id:  # released to it meanwhile
            return {"name": name, "ses_verified": current["verified"],
                    "verification_status": current["verification_status"], "dkim_status": current["dkim_status"]}
        if current is not None and current.get("verified"):
            raise ApiError(409, q.NOT_OWNED, f"domain {name!r} is verified by another tenant")
        rec = _new_record(st, actor, name, None)
        _with_keys(st, rec, keys)
        rec.update(verification_token=token, verification_status=dns_check.SUCCESS)
        await _save(st, rt, actor, "domain.update", "GET /domains/{name}/ses-status", rec,
                    current["tenant_id"] if current is not None else None)
    log.info("unverified domain claim released to a tenant that proved DNS control",
             extra={"domain": name, "tenant_id": actor.tenant_id})
    return {"name": name, "ses_verified": False, "verification_status": dns_check.SUCCESS,
            "dkim_status": dns_check.PENDING}


async def _check_rotation(resolver: Any, rec: dict[str, Any]) -> None:
    """Rotation step: once the next key's record is published and verifies, it becomes the signing
    key and the old selector is retired (its record may then be removed). Mutates ``rec``."""
    status = await dns_check.check_dkim(resolver, f"{rec['dkim_next_selector']}._domainkey.{rec['name']}",
                                        rec["dkim_next_public_key"])
    rec["dkim_next_status"] = status
    if status != dns_check.SUCCESS:
        return
    rec["dkim_retired_selectors"] = [*(rec.get("dkim_retired_selectors") or []), rec["dkim_selector"]]
    standby = [k["status"] for k in rec.get("dkim_standby") or []]
    rec.update(dkim_selector=rec["dkim_next_selector"], dkim_public_key=rec["dkim_next_public_key"],
               dkim_private_key_enc=rec["dkim_next_private_key_enc"],
               dkim_status=dns_check.combined([dns_check.SUCCESS, *standby]),
               dkim_next_selector=None, dkim_next_public_key=None, dkim_next_private_key_enc=None,
               dkim_next_status=dns_check.NOT_STARTED)


@router.get("/domains/{name}/dkim", response_model=DkimOut, responses=_ERRORS,
            summary="DKIM keys of a domain: the signing selector, a rotation in progress, retired selectors")
async def get_dkim(name: str, request: Request) -> dict[str, Any]:
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    return _dkim_out(_owned(actor, rt, _domain_name(name)))


@router.post("/domains/{name}/dkim/rotate", response_model=DkimOut,
             responses={**_ERRORS, 409: {"description": "verification_not_started: call ses-verify first"}},
             summary="Start a DKIM key rotation: a new selector to publish; switched to once it verifies")
async def rotate_dkim(name: str, request: Request) -> dict[str, Any]:
    st, rt = state_of(request), _runtime(request)
    actor = authenticate(request, st)
    rec = dict(_owned(actor, rt, _domain_name(name)))
    if not rec.get("dkim_public_key"):
        raise ApiError(409, "verification_not_started", "the domain has no DKIM key yet: call ses-verify first")
    if not rec.get("dkim_next_selector"):  # idempotent while a rotation is pending
        (key,) = await _new_keys(1, {*_selectors(rec), *(rec.get("dkim_retired_selectors") or [])})
        rec.update(dkim_next_selector=key.selector, dkim_next_public_key=key.public_key_b64,
                   dkim_next_private_key_enc=st.box.encrypt(key.private_key_pem),
                   dkim_next_status=dns_check.PENDING, updated_ts=q.now_ms())
        await _save(st, rt, actor, "domain.dkim_rotate", "POST /domains/{name}/dkim/rotate", rec)
    return _dkim_out(rec)
