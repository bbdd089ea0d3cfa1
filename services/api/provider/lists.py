"""Mailing lists and their members: ``smtp-mailing-list``, ``smtp-mailing-add`` (seed) and Postbus's
``smtp-mailing-members-add`` / ``smtp-mailing-members`` / ``smtp-mailing-members-remove`` (PRODUCT.md
section 6).

A list belongs to the user that added it. ``members-add`` takes up to 10,000 members per call and
answers, per refused member, its index, email and reason (``invalid_email``, ``duplicate`` (already
on the list or repeated in the call), ``invalid_fields``, ``invalid_name``, ``invalid_status``).
Accepted addresses that are on the tenant's suppression list are stored (the suppression may be
lifted later) and named in ``suppressed``: they are never mailed while suppressed. Members are
written in chunks (at most 1,000 members or ~256 KiB per chunk): each chunk is one
``provider.member.add`` command in one transaction with its member records, decided on the
caught-up view under the tenant's fenced shard, so a concurrent call cannot add the same address
twice. A call that fails midway (503) has written its first chunks: resubmitting it is safe (those
members come back as ``duplicate``)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Depends, Query, Request
from pydantic import BaseModel, Field

from services.api.commands import ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.provider.auth import ProviderUser, checked_user
from services.api.provider.common import iso, now_ms, valid_email, write, write_fenced
from services.api.provider.envelope import ProviderError, errors, ok, provider_router
from services.api.provider.ids import next_id, next_ids
from services.api.provider.owned import LISTS
from services.api.routes_suppression import entry_key, suppression_view
from services.api.state import ApiState
from services.common.topics import CONFIG_PROVIDER_LISTS, CONFIG_PROVIDER_MEMBERS

router = provider_router(prefix="/api/v1", tags=["provider"])
MAX_MEMBERS_PER_CALL = 10_000
CHUNK_MEMBERS = 1_000
CHUNK_BYTES = 256 * 1024
MAX_FIELDS_BYTES = 4096
STATUSES = ("subscribed", "unsubscribed")


class ListAddIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    name: str = Field(..., min_length=1, max_length=200)


class MemberIn(BaseModel):
    email: Any = None
    name: Any = None
    fields: Any = None
    status: Any = None


class MembersAddIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    mailing_list_id: int
    members: list[MemberIn] = Field(..., max_length=MAX_MEMBERS_PER_CALL,
                                    description="[{email, name?, fields?: {...}, status?: subscribed|unsubscribed}]")


class MembersRemoveIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    mailing_list_id: int
    emails: list[str] = Field(default_factory=list, max_length=MAX_MEMBERS_PER_CALL)
    member_ids: list[int] = Field(default_factory=list, max_length=MAX_MEMBERS_PER_CALL)


def list_out(st: ApiState, rec: dict[str, Any]) -> dict[str, Any]:
    members = st.provider.list_members(rec["tenant_id"], int(rec["list_id"]))
    subscribed = sum(1 for m in list(members.values()) if m["status"] == "subscribed")
    return {"id": int(rec["list_id"]), "user_id": int(rec["user_id"]), "name": rec["name"],
            "members_count": len(members), "subscribed_count": subscribed, "created_at": iso(rec["created_ts"])}


def member_out(rec: dict[str, Any], suppressed: bool) -> dict[str, Any]:
    return {"id": int(rec["member_id"]), "email": rec["email"], "name": rec.get("name"),
            "fields": json.loads(rec["fields_json"] or "{}"), "status": rec["status"], "suppressed": suppressed,
            "created_at": iso(rec["created_ts"])}


@router.get("/smtp-mailing-list", summary="List the user's mailing lists", responses=errors(401, 403, 422))
async def mailing_list(request: Request, user_id: int | None = Query(None),
                       user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    return ok({"mailing_list": [list_out(st, r) for r in LISTS.of_user(st, user)]})


@router.post("/smtp-mailing-add", summary="Add a mailing list", responses=errors(401, 403, 422, 503))
async def mailing_add(body: ListAddIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    list_id = await next_id(st, "list", user.tenant_id, user.actor)
    rec = {"list_id": list_id, "tenant_id": user.tenant_id, "user_id": user.user_id, "name": body.name.strip(),
           "created_ts": now_ms()}
    await write(st, user, "provider.list.add", "POST /api/v1/smtp-mailing-add", "ProviderList", rec,
                [ConfigRecord(CONFIG_PROVIDER_LISTS, f"{user.tenant_id}/{list_id}", "ProviderList", rec)])
    return ok({"mailing": list_out(st, rec)})


def _check_member(m: MemberIn) -> tuple[str | None, dict[str, Any] | None]:
    """(reason, clean member) for one submitted member."""
    if not isinstance(m.email, str) or not valid_email(m.email.strip()):
        return "invalid_email", None
    if m.name is not None and (not isinstance(m.name, str) or len(m.name) > 200):
        return "invalid_name", None
    if m.fields is not None and not isinstance(m.fields, dict):
        return "invalid_fields", None
    fields_json = json.dumps(m.fields or {}, separators=(",", ":"), ensure_ascii=False)
    if len(fields_json.encode()) > MAX_FIELDS_BYTES:
        return "invalid_fields", None
    status = m.status if m.status is not None else "subscribed"
    if status not in STATUSES:
        return "invalid_status", None
    name = m.name.strip() if isinstance(m.name, str) and m.name.strip() else None
    return None, {"email": m.email.strip().lower(), "name": name, "fields_json": fields_json, "status": status}


@router.post("/smtp-mailing-members-add", summary="Add up to 10,000 members to a list (per-member reasons)",
             responses=errors(401, 403, 404, 422, 503))
async def members_add(body: MembersAddIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    list_id = int(LISTS.owned(st, user, body.mailing_list_id)["list_id"])
    refused: list[dict[str, Any]] = []
    candidates: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    for i, m in enumerate(body.members):
        reason, clean = _check_member(m)
        email = clean["email"] if clean else (m.email if isinstance(m.email, str) else None)
        if clean is not None and clean["email"] in seen:
            reason = "duplicate"
        if reason or clean is None:
            refused.append({"index": i, "email": email, "reason": reason})
            continue
        seen.add(clean["email"])
        candidates.append((i, clean))
    on_list = st.provider.member_by_email
    fresh = [(i, c) for i, c in candidates if (user.tenant_id, list_id, c["email"]) not in on_list]
    refused += [{"index": i, "email": c["email"], "reason": "duplicate"}
                for i, c in candidates if (user.tenant_id, list_id, c["email"]) in on_list]
    added: list[dict[str, Any]] = []
    if fresh:
        first = await next_ids(st, "member", len(fresh), user.tenant_id, user.actor)
        now = now_ms()
        recs = [(i, {"member_id": first + n, "list_id": list_id, "tenant_id": user.tenant_id, **c, "created_ts": now})
                for n, (i, c) in enumerate(fresh)]
        shard = await st.writer.shard_of(user.tenant_id)
        for chunk in _chunks(recs):
            written: list[tuple[int, dict[str, Any]]] = []
            dups: list[tuple[int, dict[str, Any]]] = []

            def build(chunk: list[tuple[int, dict[str, Any]]] = chunk, written: list[Any] = written,
                      dups: list[Any] = dups) -> ConfigWrite:
                written.clear()
                dups.clear()
                for i, r in chunk:  # decided on the caught-up view: another call may have added some
                    (dups if (user.tenant_id, list_id, r["email"]) in on_list else written).append((i, r))
                payload = {"tenant_id": user.tenant_id, "user_id": user.user_id, "list_id": list_id,
                           "members": [{"member_id": r["member_id"], "email": r["email"], "name": r["name"],
                                        "fields_json": r["fields_json"]} for _, r in written]}
                records = [ConfigRecord(CONFIG_PROVIDER_MEMBERS, f"{user.tenant_id}/{list_id}/{r['member_id']}",
                                        "ProviderMember", r) for _, r in written]
                return ConfigWrite("provider.member.add", user.tenant_id, user.actor,
                                   "POST /api/v1/smtp-mailing-members-add", "ProviderMembersChange", payload, records)

            await write_fenced(st, shard, st.provider.members.catch_up, build)
            added.extend(r for _, r in written)
            refused.extend({"index": i, "email": r["email"], "reason": "duplicate"} for i, r in dups)
    supp = suppression_view(request)
    suppressed = sorted({r["email"] for r in added if supp.get(entry_key(user.tenant_id, r["email"])) is not None})
    refused.sort(key=lambda x: x["index"])
    return ok({"mailing_list_id": list_id, "added": len(added), "refused": refused, "suppressed": suppressed,
               "members": [member_out(r, r["email"] in suppressed) for r in added[:100]]})


def _chunks(recs: list[tuple[int, dict[str, Any]]]) -> list[list[tuple[int, dict[str, Any]]]]:
    out: list[list[tuple[int, dict[str, Any]]]] = []
    cur: list[tuple[int, dict[str, Any]]] = []
    size = 0
    for item in recs:
        rec_size = 200 + len(item[1]["email"]) + len(item[1]["fields_json"].encode()) + len(item[1]["name"] or "")
        if cur and (len(cur) >= CHUNK_MEMBERS or size + rec_size > CHUNK_BYTES):
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += rec_size
    if cur:
        out.append(cur)
    return out


@router.get("/smtp-mailing-members", summary="List a mailing list's members (paged)",
            responses=errors(401, 403, 404, 422))
async def members(request: Request, user_id: int | None = Query(None), mailing_list_id: str | None = Query(None),
                  page: int = Query(1, ge=1, le=1_000_000), per_page: int = Query(100, ge=1, le=1000),
                  status: str | None = Query(None, description="subscribed | unsubscribed"),
                  user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    lst = LISTS.owned(st, user, mailing_list_id)
    if status is not None and status not in STATUSES:
        raise ProviderError(422, "The selected status is invalid.")
    recs = sorted((m for m in list(st.provider.list_members(user.tenant_id, int(lst["list_id"])).values())
                   if status is None or m["status"] == status), key=lambda m: int(m["member_id"]))
    supp = suppression_view(request)
    start = (page - 1) * per_page
    items = [member_out(m, supp.get(entry_key(user.tenant_id, m["email"])) is not None)
             for m in recs[start:start + per_page]]
    total = len(recs)
    return ok({"members": items, "pagination": {"page": page, "per_page": per_page, "total": total,
                                                "last_page": max(1, -(-total // per_page))}})


@router.post("/smtp-mailing-members-remove", summary="Remove members from a list (by email or member id)",
             responses=errors(401, 403, 404, 422, 503))
async def members_remove(body: MembersRemoveIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    list_id = int(LISTS.owned(st, user, body.mailing_list_id)["list_id"])
    if not body.emails and not body.member_ids:
        raise ProviderError(422, "The emails or member ids field is required.")
    current = st.provider.list_members(user.tenant_id, list_id)
    ids: set[int] = set()
    not_found: list[Any] = []
    for e in body.emails:
        mid = st.provider.member_by_email.get((user.tenant_id, list_id, e.strip().lower()))
        if mid is None:
            not_found.append(e)
        else:
            ids.add(mid)
    for mid in body.member_ids:
        if mid in current:
            ids.add(mid)
        else:
            not_found.append(mid)
    removed = sorted(ids)
    for i in range(0, len(removed), CHUNK_MEMBERS):
        part = removed[i:i + CHUNK_MEMBERS]
        await write(st, user, "provider.member.remove", "POST /api/v1/smtp-mailing-members-remove", "ProviderRef",
                    {"tenant_id": user.tenant_id, "user_id": user.user_id, "kind": "member",
                     "ids": [f"{list_id}/{m}" for m in part]},
                    [ConfigRecord(CONFIG_PROVIDER_MEMBERS, f"{user.tenant_id}/{list_id}/{m}", None, None)
                     for m in part])
    return ok({"mailing_list_id": list_id, "removed": len(removed), "not_found": not_found})
